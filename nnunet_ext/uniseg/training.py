"""UniSeg training pieces: per-task label spaces, the sliced Dice+CE loss and the task-balanced data loader.

**Label spaces.** A merged dataset has one global label space (dataset.json ``labels``); the task registry
(``nnunet_ext_tasks``) lists each task's labels. UniSeg gives task t its own label space ``0..K_t-1``: local class
``j+1`` is the task's j-th label, everything else is background (0). :func:`local_label_table` is that map as a
(T, V) lookup table; the ignore label keeps its value (it lies outside every task's classes).

**Loss** (:class:`SlicedDCCELoss`): nnU-Net's Dice + CE (``MemoryEfficientSoftDiceLoss`` without background,
smooth 1e-5, ``RobustCrossEntropyLoss``, weights 1:1, ignore label masked) on each sample's logits sliced to
its task's ``K_t`` classes. It is computed on the full ``K``-channel tensor with the channels beyond ``K_t`` set
to a large negative value (softmax probability exactly 0) and left out of the Dice mean: for a single-task
batch this equals nnU-Net's loss on ``logits[:, :K_t]`` (tested), channels beyond ``K_t`` get zero gradient, and
tensor shapes never depend on the task. Batch Dice pools the sums per (task, class) - (T, K-1) tensors, summed
over the batch and, under DDP, all-gathered - and averages the Dice over the pairs present: local class j of
one task is never pooled with class j of another task (mixed batches, ranks training different tasks).

**Sampler** (:class:`TaskBalancedDataLoader`): every batch holds cases of ONE task (the paper's single-task
batches); tasks take turns in shuffled rounds (each round every task once), so each task gets an equal share
of the batches (the paper: 50 batches per task per cycle; the trainer's epoch is ``50 * T`` iterations). Cases inside a task are drawn uniformly, with
nnU-Net's foreground oversampling. Each data-loader worker (and each DDP rank) runs its own rounds, so every
rank always gets valid single-task batches and the shares stay equal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn

from nnunet_ext.core.errors import UserError
from nnunet_ext.multitask.partial_labels import LAYOUT_KEY, TaskLayout
from nnunet_ext.multitask.tasks import TASKS_KEY

__all__ = ["local_label_table", "to_local_targets", "SlicedDCCELoss", "TaskBalancedDataLoader"]

_NEG = -1.0e4  # masked logit: exp(-1e4 - max) == 0 in float32, finite in fp16


def local_label_table(
    task_labels: Sequence[Sequence[int]], num_values: int, ignore_label: int | None
) -> torch.Tensor:
    """(T, V) long: the local class of every global label value per task (0 = background)."""
    v = max(int(num_values), (ignore_label + 1) if ignore_label is not None else 0)
    table = torch.zeros(len(task_labels), v, dtype=torch.long)
    for t, labs in enumerate(task_labels):
        for j, lab in enumerate(labs):
            table[t, int(lab)] = j + 1
        if ignore_label is not None:
            table[t, int(ignore_label)] = int(ignore_label)
    return table


def to_local_targets(target: torch.Tensor, task_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Global label map(s) (B, 1, *spatial) -> each sample's task-local classes (same shape and dtype)."""
    b = target.shape[0]
    rows = table.to(target.device)[task_ids.to(target.device)]  # (B, V)
    flat = target.reshape(b, -1).long().clamp(0, rows.shape[1] - 1)
    return torch.gather(rows, 1, flat).reshape(target.shape).to(target.dtype)


class SlicedDCCELoss(nn.Module):
    """nnU-Net's Dice + CE on the logits of each sample's task classes (see the module docstring).

    ``forward(logits (B, K, *spatial), target (B, 1, *spatial) local classes, task_ids (B,))``.
    """

    def __init__(
        self,
        task_classes: Sequence[int],
        num_outputs: int,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        ignore_label: int | None = None,
        ddp: bool = False,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
    ):
        super().__init__()
        valid = torch.zeros(len(task_classes), int(num_outputs), dtype=torch.bool)
        for t, k in enumerate(task_classes):
            if not 1 < int(k) <= num_outputs:
                raise ValueError(f"task {t} has {k} classes; needs 2..{num_outputs}")
            valid[t, : int(k)] = True
        self.register_buffer("class_valid", valid, persistent=False)
        self.batch_dice = bool(batch_dice)
        self.smooth = float(smooth)
        self.ignore_label = ignore_label
        self.ddp = bool(ddp)
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        task_ids = task_ids.to(logits.device, torch.long)
        valid = self.class_valid.to(logits.device)[task_ids]  # (B, K)
        shape = (*valid.shape, *([1] * (logits.ndim - 2)))
        x = torch.where(valid.view(shape), logits.float(), torch.full_like(logits, _NEG, dtype=torch.float32))
        tgt = target.long()
        if self.ignore_label is not None:
            mask = tgt != self.ignore_label  # (B, 1, ...)
            tgt_dice = torch.where(mask, tgt, 0)
        else:
            mask, tgt_dice = None, tgt
        loss = x.new_zeros(())
        if self.weight_dice:
            loss = loss + self.weight_dice * self._dice(torch.softmax(x, 1), tgt_dice, mask, valid, task_ids)
        if self.weight_ce:
            ce_target = tgt[:, 0]
            if mask is None or bool(mask.any()):
                ce = nn.functional.cross_entropy(
                    x, ce_target, ignore_index=self.ignore_label if self.ignore_label is not None else -100
                )
                loss = loss + self.weight_ce * ce
        return loss

    def _dice(self, prob, tgt, mask, valid, task_ids) -> torch.Tensor:
        axes = tuple(range(2, prob.ndim))
        with torch.no_grad():
            onehot = torch.zeros_like(prob).scatter_(1, tgt, 1)[:, 1:]
            sum_gt = onehot.sum(axes) if mask is None else (onehot * mask).sum(axes)
        p = prob[:, 1:]
        if mask is None:
            intersect, sum_pred = (p * onehot).sum(axes), p.sum(axes)
        else:
            intersect, sum_pred = (p * onehot * mask).sum(axes), (p * mask).sum(axes)
        weight = valid[:, 1:].float()  # (B, K-1): which foreground classes each sample's task has
        if self.batch_dice:
            # pool per (task, class): local class j of one task is another structure than class j of another
            # task, so mixed batches and DDP ranks training different tasks never share a Dice term
            t = self.class_valid.shape[0]
            onehot_task = torch.nn.functional.one_hot(task_ids, t).to(intersect.dtype)  # (B, T)

            def per_task(v):  # (B, K-1) -> (T, K-1)
                return onehot_task.transpose(0, 1) @ v

            intersect, sum_pred, sum_gt = per_task(intersect), per_task(sum_pred), per_task(sum_gt)
            weight = per_task(weight)
            if self.ddp:
                from nnunetv2.utilities.ddp_allgather import AllGatherGrad

                intersect = AllGatherGrad.apply(intersect).sum(0)
                sum_pred = AllGatherGrad.apply(sum_pred).sum(0)
                sum_gt = AllGatherGrad.apply(sum_gt).sum(0)
                weight = AllGatherGrad.apply(weight).sum(0)
            weight = (weight > 0).float()  # (T, K-1): the (task, class) pairs present in the batch
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return -(dc * weight).sum() / weight.sum().clamp_min(1.0)


class TaskBalancedDataLoader(nnUNetDataLoader):
    """nnU-Net's training data loader drawing single-task batches, tasks in shuffled rounds (each task once per
    round). ``task_of_case``: case identifier -> task index. Tasks without a case here are skipped."""

    def __init__(self, *args, task_of_case: Mapping[str, int], **kwargs):
        super().__init__(*args, **kwargs)
        by_task: dict[int, list[str]] = {}
        for key in self.indices:
            by_task.setdefault(int(task_of_case[key]), []).append(key)
        if not by_task:
            raise ValueError("no training cases")
        self.cases_by_task = {t: sorted(v) for t, v in sorted(by_task.items())}
        self.task_order: list[int] = []

    def next_task(self) -> int:
        if not self.task_order:
            self.task_order = [int(t) for t in np.random.permutation(list(self.cases_by_task))]
        return self.task_order.pop(0)

    def get_indices(self):
        cases = self.cases_by_task[self.next_task()]
        return list(np.random.choice(cases, self.batch_size, replace=True))


#: plans key holding UniSeg's extra network facts (per-task image channels)
UNISEG_KEY = "nnunet_ext_uniseg"


def task_channels_from_dataset_json(dataset_json: dict, layout: TaskLayout) -> list[int]:
    """Per task its number of image channels: the registry entry's ``channels`` (written by
    ``nnunet-ext uniseg merge`` for mixed-modality data), else every channel of the dataset."""
    n = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    entries = dataset_json.get(TASKS_KEY, {})
    out = []
    for t in layout.tasks:
        c = entries.get(t, {}).get("channels", n) if isinstance(entries.get(t), dict) else n
        if not isinstance(c, int) or not 1 <= c <= n:
            raise UserError(
                f"task {t!r}: 'channels' in dataset.json['{TASKS_KEY}'] must be an integer 1..{n} (the number of "
                f"leading image channels its cases have), got {c!r}."
            )
        out.append(int(c))
    return out


def uniseg_facts_from_plans(plans: dict) -> dict:
    """The layout and per-task channels a UniSeg model was built with (from its plans.json)."""
    if LAYOUT_KEY not in plans:
        raise UserError(
            "these plans carry no UniSeg task layout; use the plans.json of a model trained with nnUNetTrainerUniSeg."
        )
    return {
        "layout": TaskLayout.from_json(plans[LAYOUT_KEY]),
        **json.loads(json.dumps(plans.get(UNISEG_KEY, {}))),
    }
