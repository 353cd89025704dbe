"""DoDNet (dynamic on-demand network for partially labelled data; Zhang et al., CVPR 2021) as an nnU-Net v2
trainer.

``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDoDNet`` on a dataset with a task registry
(``dataset.json['nnunet_ext_tasks']``; e.g. made by ``nnunet-ext tasks merge``), or on a fully labelled
dataset (one task annotating every label). ``nnUNetv2_predict -tr nnUNetTrainerDoDNet`` returns the
universal label map. See docs/dodnet.md.
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ext.architectures.dodnet import DoDNet
from nnunet_ext.architectures.from_plans import method_network_from_plans
from nnunet_ext.core.train_step import (
    autocast_for,
    batch_to_device,
    call_with_tasks,
    deep_supervision,
    optimizer_step,
    per_scale_loss,
)
from nnunet_ext.multitask.partial_labels import (
    LAYOUT_KEY,
    PartialLabelLoss,
    TaskLayout,
    foreground_labels,
    layout_from_plans,
    single_task_segmentation,
)
from nnunet_ext.multitask.trainer import TaskRegistryTrainerMixin


class nnUNetTrainerDoDNet(TaskRegistryTrainerMixin, nnUNetTrainer):
    """nnU-Net's trainer with DoDNet's network (:class:`nnunet_ext.architectures.dodnet.DoDNet`) and the
    partial-label loss (:class:`nnunet_ext.multitask.partial_labels.PartialLabelLoss`); data, augmentation, schedule, SGD,
    checkpoints and inference are nnU-Net's.

    * the task of a training case comes from its identifier through the task registry (``batch['keys']``),
      so batches may mix tasks; without a registry every case is one task annotating every label;
    * ``train_step`` / ``validation_step`` pass the batch's task ids to the network, which runs only each
      sample's own task head (``forward(x, task_ids)``: (B, K, ...) logits for the partial-label loss); called
      with the image only (nnU-Net's predictor) it runs every task's head in one pass and, in eval mode, returns
      universal logits, so nnU-Net's validation, ``--val`` and ``nnUNetv2_predict`` run unchanged.
    """

    network_class_name = "nnunet_ext.architectures.dodnet.DoDNet"
    network_class = DoDNet
    #: dynamic head: ``head_channels -> ... -> K`` with ``head_layers`` 1x1 convs (the paper: 8, 3)
    head_channels: int = 8
    head_layers: int = 3

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        foreground_labels(dataset_json)  # refuses region-based datasets with the fix
        self.task_layout, self.task_registry = TaskLayout.from_dataset_json(dataset_json)
        # the layout travels with the model: nnU-Net saves these plans as the results folder's plans.json (read by
        # build_network_architecture at inference) and in the checkpoint's init_args
        self.plans_manager.plans[LAYOUT_KEY] = self.task_layout.to_json()

    # ------------------------------------------------------------------------------------------------ network
    @classmethod
    def network_extra_kwargs(cls) -> dict:
        return {"head_channels": cls.head_channels, "head_layers": cls.head_layers}

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """The method's network from the configuration's PlainConvUNet / ResidualEncoderUNet kwargs and the
        task layout (see :func:`layout_from_plans`); called at training AND inference."""
        layout = layout_from_plans(plans_manager, num_output_channels)
        return method_network_from_plans(
            cls.__name__,
            cls.network_class_name,
            (DoDNet, cls.network_class),
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
            # num_structures is derived from the task labels: never taken from the plans
            {
                "task_labels": [list(v) for v in layout.labels],
                "num_structures": None,
                **cls.network_extra_kwargs(),
            },
        )

    # --------------------------------------------------------------------------------------------------- loss
    def _build_loss(self):
        loss = PartialLabelLoss(self.task_layout, ignore_label=self.label_manager.ignore_label)
        return deep_supervision(self, loss).to(self.device)

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(self, batch)
        task_ids = self.task_ids(batch["keys"])
        # training mode: the network returns the (B, K, ...) logits of each sample's own task
        return optimizer_step(
            self, lambda: call_with_tasks(self.loss, self.network(data, task_ids), target, task_ids)
        )

    def validation_step(self, batch: dict) -> dict:
        """Partial-label loss and the pseudo Dice of each sample's own task (single-task decoding: threshold 0.5,
        later structure of the task wins); a label counts only in samples whose task annotates it."""
        data, target = batch_to_device(self, batch)
        task_ids = self.task_ids(batch["keys"])
        net = self.unwrapped_network()  # the per-task outputs (eval mode returns universal logits)
        with autocast_for(self):
            output = net.forward_tasks(data, task_ids)  # (B, K, ...): each sample's own task
            del data
            loss = call_with_tasks(self.loss, output, target, task_ids)
        if isinstance(output, list):
            output, target = output[0], target[0]
        seg = single_task_segmentation(
            output, task_ids, per_scale_loss(self.loss)
        )  # (B, *spatial) label values
        target = target[:, 0].long()
        ignore = self.label_manager.ignore_label
        valid = (target != ignore) if ignore is not None else torch.ones_like(target, dtype=torch.bool)
        num_fg = self.label_manager.num_segmentation_heads - 1
        annotated = torch.zeros(seg.shape[0], num_fg + 1, dtype=torch.bool, device=seg.device)
        table = per_scale_loss(self.loss).label_table.to(seg.device)[task_ids]  # (B, K)
        for j in range(table.shape[1]):
            has = table[:, j] >= 0
            annotated[has, table[has, j]] = True
        tp = np.zeros(num_fg)
        fp = np.zeros(num_fg)
        fn = np.zeros(num_fg)
        axes = tuple(range(1, seg.ndim))
        members = per_scale_loss(self.loss).target_table.to(seg.device)[
            task_ids
        ]  # (B, K, V): values of each structure
        v = members.shape[2]
        for lab in range(1, num_fg + 1):
            rows = annotated[:, lab]
            if not rows.any():
                continue
            # the label values structure `lab` covers in each sample's task (nested: organ = organ + tumour)
            j = (table[rows] == lab).float().argmax(1)  # (R,)
            m = members[rows][torch.arange(int(rows.sum()), device=seg.device), j]  # (R, V)
            flat_p = seg[rows].reshape(m.shape[0], -1).long().clamp(0, v - 1)
            flat_t = target[rows].reshape(m.shape[0], -1).long().clamp(0, v - 1)
            p = torch.gather(m, 1, flat_p).reshape(seg[rows].shape) & valid[rows]
            t = torch.gather(m, 1, flat_t).reshape(target[rows].shape) & valid[rows]
            tp[lab - 1] = float((p & t).sum(axes).sum())
            fp[lab - 1] = float((p & ~t).sum(axes).sum())
            fn[lab - 1] = float((~p & t).sum(axes).sum())
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}
