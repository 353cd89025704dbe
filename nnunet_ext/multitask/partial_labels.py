"""Partially labelled data (DoDNet / TransDoDNet): the task layout a network is built for, and the loss.

**Task layout.** A multi-task network needs, for every task, the labels it segments (its *structures*) in
the order of its output channels. :class:`TaskLayout` is that list, taken from the dataset's task registry
(``dataset.json['nnunet_ext_tasks']``, see docs/task-registry.md). A dataset without a registry is one task
(``"all"``) that annotates every foreground label, so a fully labelled dataset trains unchanged.

Each task gets ``K = max_t |labels_t|`` output channels (the paper's organ/tumour pair: K = 2); channel
``j < |labels_t|`` of task ``t`` is the sigmoid of structure ``labels_t[j]``, the rest are unused padding
(never in the loss, never in a prediction). Networks output ``T * K`` channels, task-major
(``[task0 ch0..K-1, task1 ch0..K-1, ...]``).

The layout travels with the trained model: the trainer writes it into its copy of the plans under
``LAYOUT_KEY`` (nnU-Net saves that copy as ``plans.json`` in the results folder and in the checkpoint's
``init_args``), where ``build_network_architecture`` - which gets the plans, not dataset.json - reads it at
training and at inference.

**Structures and precedence.** Every structure's target is its own label value (``label == v``; a tumour
voxel is *not* an organ voxel in the target), unless the task is *nested* (registry ``"nested": true``, set for
liver, kidney and pancreas in the MOTS preset): then structure j's target is the union of the task's labels j,
j+1, ... (DoDNet's organ channel is organ + tumour, ``label >= 1``); the organ is then also scored on that union. Where two structures are both predicted (probability > 0.5),
the one listed later in its task wins: tasks list their structures from the outside in (organ, then tumour),
so the tumour wins over its organ. Across tasks the higher probability wins.

**Loss.** :class:`PartialLabelLoss`: per structure a sigmoid channel; soft Dice
``1 - 2 sum(p t) / (sum(p) + sum(t) + 1)`` + BCE (voxel mean) per sample and structure, averaged over the
(sample, structure) pairs whose structure the sample's task annotates; nothing else enters the loss (a
structure the task does not annotate is unknown, not background). nnU-Net's ignore label is masked out.
The trainer wraps it in nnU-Net's ``DeepSupervisionWrapper`` with nnU-Net's weights
(:func:`nnunet_ext.core.train_step.deep_supervision`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.core.errors import UserError
from nnunet_ext.multitask.tasks import TASKS_KEY, TaskRegistry, load_task_registry

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

__all__ = [
    "LAYOUT_KEY",
    "SINGLE_TASK",
    "TaskLayout",
    "PartialLabelLoss",
    "foreground_labels",
]

LAYOUT_KEY = "nnunet_ext_task_layout"
SINGLE_TASK = "all"


def foreground_labels(dataset_json: Mapping) -> tuple[list[int], int, int | None]:
    """(foreground label values, nnU-Net's number of output channels, ignore label) of a dataset.json."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if lm.has_regions:
        raise UserError(
            "DoDNet / TransDoDNet predict one sigmoid channel per label, but this dataset.json uses region-based "
            "training ('regions_class_order'). Use integer labels (no regions)."
        )
    return [int(v) for v in lm.foreground_labels], int(lm.num_segmentation_heads), lm.ignore_label


@dataclass(frozen=True)
class TaskLayout:
    """Tasks (ordered: position = task index) and the label values each task segments, in channel order."""

    tasks: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    num_classes: int  # nnU-Net's output channels: background + foreground labels (ignore excluded)
    #: per task: nested structures (structure j's target = labels j, j+1, ...: DoDNet's organ covers its tumour)
    nested: tuple[bool, ...] = ()

    def __post_init__(self):
        if len(self.tasks) == 0 or len(self.tasks) != len(self.labels):
            raise ValueError("a task layout needs at least one task and one label list per task")
        if not self.nested:
            object.__setattr__(self, "nested", tuple(False for _ in self.tasks))
        object.__setattr__(self, "nested", tuple(bool(v) for v in self.nested))
        if len(self.nested) != len(self.tasks):
            raise ValueError("a task layout needs one nested flag per task")
        for t, labs, nest in zip(self.tasks, self.labels, self.nested):
            if nest and len(labs) < 2:
                raise ValueError(f"task {t!r} is nested but has only one label")
        for t, labs in zip(self.tasks, self.labels):
            if len(labs) == 0:
                raise ValueError(f"task {t!r} has no labels")
            for v in labs:
                if not 0 < v < self.num_classes:
                    raise ValueError(
                        f"task {t!r}: label {v} is outside the network's labels 1..{self.num_classes - 1}"
                    )

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_structures(self) -> int:
        """K: output channels per task (the largest number of labels of a task)."""
        return max(len(labs) for labs in self.labels)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise UserError(f"unknown task {task!r}; this model has the tasks {list(self.tasks)}.")
        return self.tasks.index(task)

    def to_json(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "labels": [list(v) for v in self.labels],
            "num_classes": self.num_classes,
            "nested": list(self.nested),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> TaskLayout:
        return cls(
            tuple(str(t) for t in d["tasks"]),
            tuple(tuple(int(v) for v in labs) for labs in d["labels"]),
            int(d["num_classes"]),
            tuple(bool(v) for v in d.get("nested", ())),
        )

    @classmethod
    def single_task(cls, num_classes: int, labels: Sequence[int] | None = None) -> TaskLayout:
        """One task annotating every foreground label (a fully labelled dataset)."""
        labels = list(range(1, num_classes)) if labels is None else list(labels)
        return cls((SINGLE_TASK,), (tuple(labels),), int(num_classes))

    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping) -> tuple[TaskLayout, TaskRegistry | None]:
        """The layout of a dataset and its registry (``None`` without ``nnunet_ext_tasks``: one task)."""
        fg, num_classes, _ = foreground_labels(dataset_json)
        if TASKS_KEY not in dataset_json:
            return cls.single_task(num_classes, fg), None
        registry = load_task_registry(dataset_json)
        layout = cls(
            registry.tasks,
            tuple(tuple(registry.labels_of(t)) for t in registry.tasks),
            num_classes,
            tuple(registry.nested_of(t) for t in registry.tasks),
        )
        return layout, registry

    def label_table(self) -> torch.Tensor:
        """(T, K) long tensor: the label value of every (task, channel), -1 for padding channels."""
        table = torch.full((self.num_tasks, self.num_structures), -1, dtype=torch.long)
        for t, labs in enumerate(self.labels):
            table[t, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        return table

    def target_table(self, num_values: int | None = None) -> torch.Tensor:
        """(T, K, V) bool: whether label value v counts as structure k of task t (``v == labels_t[k]``; nested
        tasks: ``v in labels_t[k:]``). ``V = max(num_values, num_classes)``."""
        v = max(int(num_values or 0), self.num_classes)
        table = torch.zeros(self.num_tasks, self.num_structures, v, dtype=torch.bool)
        for t, labs in enumerate(self.labels):
            for j in range(len(labs)):
                members = labs[j:] if self.nested[t] else labs[j : j + 1]
                table[t, j, list(members)] = True
        return table

    def scoring_regions(self, task: str) -> list:
        """What ``task``'s structures are scored on, in nnU-Net's ``labels_or_regions`` form: the label value, or
        for a nested task the tuple of its nested labels (the organ is scored on organ + tumour)."""
        t = self.task_index(task)
        labs = self.labels[t]
        if not self.nested[t]:
            return list(labs)
        return [tuple(labs[j:]) if len(labs[j:]) > 1 else labs[j] for j in range(len(labs))]


class PartialLabelLoss(nn.Module):
    """Sigmoid soft Dice + BCE over the structures each sample's task annotates (DoDNet's loss).

    ``forward(logits, target, task_ids)``: ``logits`` (B, T*K, *spatial) task-major per-structure logits of
    every task, or (B, K, *spatial) of each sample's own task (the network's training output with
    ``task_ids``), ``target`` (B, 1, *spatial) nnU-Net label map, ``task_ids``
    (B,) long task index per sample. Only channels ``task_ids[b] * K + j`` with ``j < |labels_t|`` enter the
    loss, against ``target == labels_t[j]``. Returns the mean over those (sample, structure) pairs of
    ``weight_dice * (1 - Dice) + weight_bce * BCE``.
    """

    def __init__(
        self,
        layout: TaskLayout,
        ignore_label: int | None = None,
        smooth: float = 1.0,
        weight_dice: float = 1.0,
        weight_bce: float = 1.0,
    ):
        super().__init__()
        self.num_structures = layout.num_structures
        self.num_tasks = layout.num_tasks
        self.ignore_label = ignore_label
        self.smooth = float(smooth)
        self.weight_dice = float(weight_dice)
        self.weight_bce = float(weight_bce)
        self.register_buffer("label_table", layout.label_table(), persistent=False)
        values = (
            layout.num_classes if ignore_label is None else max(layout.num_classes, int(ignore_label) + 1)
        )
        self.register_buffer("target_table", layout.target_table(values), persistent=False)  # (T, K, V)
        self.any_nested = any(layout.nested)

    def select(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B, K, *spatial): each sample's own task channels out of (B, T*K, *spatial). Logits with K channels
        are already each sample's own task's (a network called with ``task_ids``) and are returned as they are
        (with T = 1 both readings agree)."""
        b, k = logits.shape[0], self.num_structures
        if logits.shape[1] == k:
            return logits
        if logits.shape[1] != self.num_tasks * k:
            raise ValueError(
                f"expected {self.num_tasks} tasks x {k} channels = {self.num_tasks * k} channels, "
                f"got {logits.shape[1]}"
            )
        idx = task_ids.view(b, 1) * k + torch.arange(k, device=logits.device).view(1, k)
        idx = idx.view(b, k, *([1] * (logits.ndim - 2))).expand(b, k, *logits.shape[2:])
        return torch.gather(logits, 1, idx)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        task_ids = task_ids.to(logits.device, torch.long)
        sel = self.select(logits, task_ids).float()
        labels = self.label_table.to(logits.device)[task_ids]  # (B, K)
        valid = (labels >= 0).float()
        target = target.to(logits.device)
        # (B, K, *spatial): target value in structure k's label set (its own value; nested: its value and inner ones)
        if self.any_nested:
            members = self.target_table.to(logits.device)[task_ids]  # (B, K, V)
            b, k, v = members.shape
            flat = target.reshape(b, 1, -1).long().clamp(0, v - 1).expand(b, k, -1)
            tgt = torch.gather(members, 2, flat).reshape(b, k, *target.shape[2:]).float()
        else:  # every structure is its own label value
            shape = (*labels.shape, *([1] * (logits.ndim - 2)))
            tgt = (target.long() == labels.view(shape)).float()
        if self.ignore_label is not None:
            mask = (target != self.ignore_label).float()  # (B, 1, *spatial)
        else:
            mask = torch.ones_like(target, dtype=torch.float32)
        axes = tuple(range(2, logits.ndim))
        prob = torch.sigmoid(sel)
        intersect = (prob * tgt * mask).sum(axes)
        denominator = (prob * mask).sum(axes) + (tgt * mask).sum(axes) + self.smooth
        dice_loss = 1 - 2 * intersect / denominator
        bce = F.binary_cross_entropy_with_logits(sel, tgt, reduction="none")
        bce = (bce * mask).sum(axes) / mask.sum(axes).clamp_min(1.0)
        per_pair = self.weight_dice * dice_loss + self.weight_bce * bce  # (B, K)
        return (per_pair * valid).sum() / valid.sum().clamp_min(1.0)


def task_aware_summary(pred_folder: str, gt_folder: str, dataset_json: dict, reader) -> dict | None:
    """Dice per label over the cases whose task annotates it (predictions vs partial references). A nested
    task's outer structure (the organ) is scored on the union of its nested labels (organ + tumour), as DoDNet and
    the LiTS / KiTS evaluations do; the result keeps the organ's label as key."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    registry = load_task_registry(dataset_json)
    layout, _ = TaskLayout.from_dataset_json(dataset_json)
    ending = dataset_json["file_ending"]
    cases = sorted(f[: -len(ending)] for f in os.listdir(pred_folder) if f.endswith(ending))
    per_case = []
    for case in cases:
        ref = os.path.join(gt_folder, case + ending)
        if not os.path.isfile(ref):
            continue
        task = registry.task_of(case)
        regions = layout.scoring_regions(task)
        m = compute_metrics(ref, os.path.join(pred_folder, case + ending), reader, regions, None)
        by_key = {str(r): r for r in regions}
        metrics = {}
        for key, value in m["metrics"].items():
            r = by_key.get(str(key), key)
            label = r[0] if isinstance(r, (tuple, list)) else r
            metrics[str(int(label))] = value
        per_case.append({"case": case, "task": task, "metrics": metrics})
    if not per_case:
        return None
    mean = {}
    for label in sorted({k for c in per_case for k in c["metrics"]}, key=int):
        dices = [c["metrics"][label]["Dice"] for c in per_case if label in c["metrics"]]
        finite = [d for d in dices if d == d]
        mean[label] = {"Dice": float(np.mean(finite)) if finite else float("nan"), "cases": len(dices)}
    return {"mean": mean, "metric_per_case": per_case}


# ------------------------------------------------------------------------------------ cross-task merge
#: smallest cross-task weight of a (task, structure): a structure whose own-task validation Dice was 0 still
#: wins voxels no other task claims
MERGE_WEIGHT_FLOOR = 0.05
#: state-dict key (suffix) of the stored cross-task weights and of the flag saying they were computed
MERGE_WEIGHTS = "merge_weights"
MERGE_WEIGHTS_SET = "merge_weights_set"


def register_merge_weights(module: nn.Module, num_tasks: int, num_structures: int) -> None:
    """Persistent buffers ``merge_weights`` (T, K), default 1 (equal weights), and ``merge_weights_set`` (0/1):
    saved in every checkpoint, loaded by nnU-Net's predictor for every fold."""
    module.register_buffer(MERGE_WEIGHTS, torch.ones(num_tasks, num_structures))
    module.register_buffer(MERGE_WEIGHTS_SET, torch.zeros(()))


def fill_missing_merge_weights(network: nn.Module, state_dict: Mapping) -> Mapping:
    """A state dict from a checkpoint written before the weights existed: the missing buffers get the network's
    current values (equal weights, not set), so strict loading works and the merge can say they are missing."""
    own = network.state_dict()
    missing = {
        k: v for k, v in own.items() if k.endswith((MERGE_WEIGHTS, MERGE_WEIGHTS_SET)) and k not in state_dict
    }
    if not missing:
        return state_dict
    out = dict(state_dict)
    for k, v in missing.items():
        out[k] = torch.ones_like(v) if k.endswith(MERGE_WEIGHTS) else torch.zeros_like(v)
    return out


def merge_weights_from_summary(summary: Mapping, layout: TaskLayout) -> tuple[list[list[float]], dict]:
    """Cross-task weights (T, K) from an own-task validation summary (:func:`task_aware_summary`): the mean
    own-task Dice of every (task, structure) over its validation cases, floored at :data:`MERGE_WEIGHT_FLOOR`;
    1.0 where the validation has no finite Dice for it (no evidence: equal weight). Padding channels get 1."""
    k = layout.num_structures
    sums: dict[tuple[str, int], list[float]] = {}
    for case in summary.get("metric_per_case", []):
        for label, m in case["metrics"].items():
            d = m.get("Dice")
            if d is not None and d == d:
                sums.setdefault((case["task"], int(label)), []).append(float(d))
    weights, used = [], {}
    for t, labs in zip(layout.tasks, layout.labels):
        row = [1.0] * k
        for j, lab in enumerate(labs):
            vals = sums.get((t, int(lab)))
            if vals:
                row[j] = max(MERGE_WEIGHT_FLOOR, float(np.mean(vals)))
            used[f"{t}/{lab}"] = row[j]
        weights.append(row)
    return weights, used


def merge_task_decisions(
    choice: torch.Tensor, margin: torch.Tensor, label_table: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The universal label map from per-task decisions (the cross-task rule, docs/dodnet.md).

    ``choice`` (B, T, *spatial) long: each task's own decision, 0 = background, j + 1 = its structure j (DoDNet:
    the last structure with p > 0.5; UniSeg: the argmax class); ``margin`` (B, T, *spatial) in [0, 1]: how sure
    the task is of its decision (DoDNet: 2 (p - 0.5); UniSeg: top-1 minus top-2 softmax probability);
    ``label_table`` (T, K) global label of every (task, structure); ``weights`` (T, K) the stored cross-task
    weights. A voxel is background iff no task claims a structure there; otherwise it gets the label of the
    claim with the largest ``weight * margin``. A task that does not annotate a structure never votes against it
    (its background is not evidence), and a task's bonus for its inner structure never crosses tasks."""
    b, t = choice.shape[:2]
    spatial = choice.shape[2:]
    k = label_table.shape[1]
    idx = (choice - 1).clamp_min(0)
    w = weights.to(margin.device, margin.dtype)
    task_index = torch.arange(t, device=choice.device).view(1, t, *([1] * len(spatial)))
    w_sel = w.reshape(-1)[task_index * k + idx]  # (B, T, *spatial): weight of each task's chosen structure
    score = torch.where(choice > 0, w_sel * margin, torch.full_like(margin, -1.0))
    best = score.argmax(1, keepdim=True)  # (B, 1, *spatial)
    best_choice = torch.gather(choice, 1, best)[:, 0]
    flat_index = best[:, 0] * k + (best_choice - 1).clamp_min(0)
    labels = label_table.to(choice.device).reshape(-1)[flat_index].clamp_min(0)
    return torch.where(best_choice > 0, labels, torch.zeros_like(labels))


def own_task_labels(choice: torch.Tensor, label_table: torch.Tensor, task: int) -> torch.Tensor:
    """Label map (global values) of one task's own decisions ``choice`` (*spatial) long (0 background)."""
    table = torch.cat((torch.zeros(1, dtype=torch.long), label_table[task].clamp_min(0).cpu()))
    return table.to(choice.device)[choice]


def layout_from_plans(plans_manager: PlansManager, num_output_channels: int) -> TaskLayout:
    """The task layout a network is built for: the one the trainer wrote into the plans (training, and the
    results folder's plans.json at inference); else the registry of the preprocessed dataset.json; else one
    task segmenting every label (e.g. ``nnunet-ext plans check``)."""
    stored = plans_manager.plans.get(LAYOUT_KEY)
    if stored is not None:
        layout = TaskLayout.from_json(stored)
    else:
        layout = None
        pre = os.environ.get("nnUNet_preprocessed")
        name = plans_manager.plans.get("dataset_name")
        path = os.path.join(pre, name, "dataset.json") if pre and name else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                layout, _ = TaskLayout.from_dataset_json(json.load(f))
        if layout is None or layout.num_classes != num_output_channels:
            layout = TaskLayout.single_task(num_output_channels)
    if layout.num_classes != num_output_channels:
        raise UserError(
            f"the task layout in the plans ({LAYOUT_KEY}) is for {layout.num_classes} output channels but the "
            f"dataset.json has {num_output_channels}; the plans.json and dataset.json of this model folder do "
            f"not belong together. Use the files the training wrote."
        )
    return layout


def single_task_segmentation(
    output: torch.Tensor, task_ids: torch.Tensor, loss: PartialLabelLoss
) -> torch.Tensor:
    """Label map of every sample from its own task's channels: threshold 0.5, the later structure of the task
    wins (the single-task decoding of :meth:`DoDNet.universal_logits`). ``output`` (B, T*K, *spatial), or
    (B, K, *spatial) of each sample's own task."""
    sel = torch.sigmoid(loss.select(output, task_ids).float())  # (B, K, ...)
    labels = loss.label_table.to(output.device)[task_ids]  # (B, K)
    shape = (*labels.shape, *([1] * (output.ndim - 2)))
    k = labels.shape[1]
    rank = torch.arange(k, device=output.device, dtype=sel.dtype).view(1, k, *([1] * (output.ndim - 2)))
    u = (sel - 0.5) + 0.5 * rank * (sel > 0.5).to(sel.dtype)
    u = torch.where(labels.view(shape) >= 0, u, torch.full_like(u, -1.0))
    u = torch.cat((torch.zeros_like(u[:, :1]), u), 1)
    idx = u.argmax(1)  # 0 background, j+1 structure j
    values = torch.cat((torch.zeros_like(labels[:, :1]), labels.clamp_min(0)), 1)  # (B, K+1)
    return torch.gather(
        values.view(*values.shape, *([1] * (output.ndim - 2))).expand(-1, -1, *idx.shape[1:]),
        1,
        idx.unsqueeze(1),
    )[:, 0]
