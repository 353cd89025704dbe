"""The base of the networks that know their tasks (DoDNet, TransDoDNet, UniSeg).

What every such network shares lives here, once: the checks of ``task_labels`` (per task the label values it
segments), the checks of task indices passed at inference, and the cross-task merge weights of the universal
prediction (persistent buffers, written by the own-task validation, loaded by nnU-Net's predictor; checkpoints
written before the buffers existed load with equal weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnunet_ext.architectures.encoders import NNUNetEncoderNetwork
from nnunet_ext.multitask.partial_labels import (
    MERGE_WEIGHTS,
    MERGE_WEIGHTS_SET,
    fill_missing_merge_weights,
    register_merge_weights,
)


def checked_task_labels(task_labels: Sequence[Sequence[int]] | None, num_classes: int) -> list[list[int]]:
    """``task_labels`` as lists of ints, each value in 1..num_classes-1; default one task segmenting every
    label. A ValueError names what is wrong."""
    if task_labels is None:
        task_labels = [list(range(1, num_classes))]
    task_labels = [[int(v) for v in labs] for labs in task_labels]
    if not task_labels or any(len(labs) == 0 for labs in task_labels):
        raise ValueError(f"task_labels needs at least one task with at least one label, got {task_labels}")
    for labs in task_labels:
        if any(not 0 < v < num_classes for v in labs):
            raise ValueError(f"task labels {labs} must lie in 1..num_classes-1 = 1..{num_classes - 1}")
    return task_labels


class MultiTaskNetwork(NNUNetEncoderNetwork):
    """Base of the multi-task networks: ``self.num_classes``, ``self.task_labels``, ``self.num_tasks`` and
    ``self.num_structures`` (set by :meth:`_init_tasks`), the merge-weight buffers (registered by
    :meth:`_init_merge_weights` on :meth:`merge_weights_owner`) and :meth:`task_indices`."""

    def _init_tasks(self, task_labels: Sequence[Sequence[int]] | None, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.task_labels = checked_task_labels(task_labels, self.num_classes)
        self.num_tasks = len(self.task_labels)

    def merge_weights_owner(self) -> nn.Module:
        """The module holding the ``merge_weights`` (T, K) and ``merge_weights_set`` buffers (default: the
        network itself)."""
        return self

    def _init_merge_weights(self) -> None:
        # cross-task weights of the universal merge (persistent: saved with every checkpoint; set by validation)
        register_merge_weights(self.merge_weights_owner(), self.num_tasks, self.num_structures)

    @property
    def has_merge_weights(self) -> bool:
        """Whether validation stored the cross-task weights (else: equal weights)."""
        return bool(getattr(self.merge_weights_owner(), MERGE_WEIGHTS_SET) > 0)

    def set_merge_weights(self, weights) -> None:
        owner = self.merge_weights_owner()
        w = torch.as_tensor(weights, dtype=torch.float32).reshape(self.num_tasks, self.num_structures)
        getattr(owner, MERGE_WEIGHTS).copy_(w)
        getattr(owner, MERGE_WEIGHTS_SET).fill_(1.0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Checkpoints written before the merge weights existed load with equal weights (flag: not set)."""
        return super().load_state_dict(
            fill_missing_merge_weights(self, state_dict), strict=strict, assign=assign
        )

    def task_indices(self, tasks: Sequence[int] | None) -> list[int]:
        """``tasks`` as a list of task indices (``None``: all tasks); an index outside 0..T-1 is a ValueError."""
        if tasks is None:
            return list(range(self.num_tasks))
        out = [int(t) for t in tasks]
        for t in out:
            if not 0 <= t < self.num_tasks:
                raise ValueError(f"task index {t} out of range 0..{self.num_tasks - 1}")
        return out
