"""UniSeg (prompt-driven universal segmentation; Ye et al., MICCAI 2023) as an nnU-Net v2 trainer.

``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerUniSeg`` on a dataset with a task registry
(``dataset.json['nnunet_ext_tasks']``, e.g. made by ``nnunet-ext tasks merge`` or ``nnunet-ext uniseg merge``),
or on a fully labelled dataset (one task). ``nnUNetv2_predict -tr nnUNetTrainerUniSeg`` writes every task's
prediction merged into the global label map. See docs/uniseg.md.
"""

from __future__ import annotations

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ext.architectures.from_plans import method_network_from_plans
from nnunet_ext.architectures.uniseg import UniSeg
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.train_step import (
    autocast_for,
    call_with_tasks,
    deep_supervision,
    optimizer_step,
    per_scale_loss,
)
from nnunet_ext.multitask.partial_labels import (
    LAYOUT_KEY,
    TaskLayout,
    foreground_labels,
    layout_from_plans,
)
from nnunet_ext.multitask.trainer import TaskRegistryTrainerMixin
from nnunet_ext.uniseg.training import (
    UNISEG_KEY,
    SlicedDCCELoss,
    TaskBalancedDataLoader,
    local_label_table,
    task_channels_from_dataset_json,
    to_local_targets,
)


class nnUNetTrainerUniSeg(TaskRegistryTrainerMixin, nnUNetTrainer):
    """nnU-Net's trainer with UniSeg's network (:class:`nnunet_ext.architectures.uniseg.UniSeg`): learned
    universal prompt + fusion, the task's prompt channel concatenated to the bottleneck, per-task label spaces
    (logits sliced to the task's classes for Dice+CE with deep supervision) and single-task batches with
    balanced task sampling. Data pipeline, augmentation, SGD + poly schedule, checkpoints are nnU-Net's.

    The task of a batch comes from its case identifiers (``batch['keys']``) through the task registry and is
    passed to ``network(data, task_ids)``; nnU-Net's predictor calls ``network(x)`` and gets all tasks merged.
    """

    network_class_name = "nnunet_ext.architectures.uniseg.UniSeg"
    #: iterations per epoch = ``iterations_per_task * number of tasks`` (the official UniSeg_Trainer:
    #: ``num_batches_per_epoch = 50 * total_task_num``, 550 for its 11 tasks)
    iterations_per_task: int = 50

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
        self.task_channels = task_channels_from_dataset_json(dataset_json, self.task_layout)
        # travels with the model (results folder's plans.json and the checkpoint's init_args)
        self.plans_manager.plans[LAYOUT_KEY] = self.task_layout.to_json()
        self.plans_manager.plans[UNISEG_KEY] = {"task_channels": self.task_channels}
        self.num_iterations_per_epoch = int(self.iterations_per_task) * self.task_layout.num_tasks
        self.local_table = local_label_table(
            [list(v) for v in self.task_layout.labels],
            self.label_manager.num_segmentation_heads,
            self.label_manager.ignore_label,
        )

    # ------------------------------------------------------------------------------------------------ network
    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """UniSeg from the configuration's PlainConvUNet / ResidualEncoderUNet kwargs, the patch size (prompt
        shape) and the task layout in the plans; called at training AND inference."""
        layout = layout_from_plans(plans_manager, num_output_channels)
        channels = (plans_manager.plans.get(UNISEG_KEY) or {}).get("task_channels")
        if channels is not None and len(channels) != layout.num_tasks:
            channels = None
        return method_network_from_plans(
            cls.__name__,
            cls.network_class_name,
            (UniSeg,),
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
            {
                "task_labels": [list(v) for v in layout.labels],
                "patch_size": [int(p) for p in configuration_manager.patch_size],
                "task_channels": channels,
            },
        )

    def get_dataloaders(self):
        """nnU-Net's loaders; the training loader draws single-task batches with balanced task sampling."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size,
            rotation_for_DA,
            deep_supervision_scales,
            mirror_axes,
            do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=regions,
            ignore_label=self.label_manager.ignore_label,
        )
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales,
            is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=regions,
            ignore_label=self.label_manager.ignore_label,
        )
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        task_of_case = {
            k: int(i) for k, i in zip(dataset_tr.identifiers, self.task_ids(dataset_tr.identifiers))
        }
        dl_tr = TaskBalancedDataLoader(
            dataset_tr,
            self.batch_size,
            initial_patch_size,
            self.configuration_manager.patch_size,
            self.label_manager,
            oversample_foreground_percent=self.oversample_foreground_percent,
            sampling_probabilities=None,
            pad_sides=None,
            transforms=tr_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling,
            task_of_case=task_of_case,
        )
        dl_val = nnUNetDataLoader(
            dataset_val,
            self.batch_size,
            self.configuration_manager.patch_size,
            self.configuration_manager.patch_size,
            self.label_manager,
            oversample_foreground_percent=self.oversample_foreground_percent,
            sampling_probabilities=None,
            pad_sides=None,
            transforms=val_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling,
        )
        allowed_num_processes = get_allowed_n_proc_DA()
        if allowed_num_processes == 0:
            mt_gen_train = SingleThreadedAugmenter(dl_tr, None)
            mt_gen_val = SingleThreadedAugmenter(dl_val, None)
        else:
            mt_gen_train = NonDetMultiThreadedAugmenter(
                data_loader=dl_tr,
                transform=None,
                num_processes=allowed_num_processes,
                num_cached=max(6, allowed_num_processes // 2),
                seeds=None,
                pin_memory=self.device.type == "cuda",
                wait_time=0.002,
            )
            mt_gen_val = NonDetMultiThreadedAugmenter(
                data_loader=dl_val,
                transform=None,
                num_processes=max(1, allowed_num_processes // 2),
                num_cached=max(3, allowed_num_processes // 4),
                seeds=None,
                pin_memory=self.device.type == "cuda",
                wait_time=0.002,
            )
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    # --------------------------------------------------------------------------------------------------- loss
    def _build_loss(self):
        if self.label_manager.has_regions:
            raise UserError("UniSeg needs integer labels (no region-based training).")
        loss = SlicedDCCELoss(
            [len(v) + 1 for v in self.task_layout.labels],
            max(len(v) + 1 for v in self.task_layout.labels),
            batch_dice=self.configuration_manager.batch_dice,
            smooth=1e-5,
            ignore_label=self.label_manager.ignore_label,
            ddp=self.is_ddp,
        )
        return deep_supervision(self, loss).to(self.device)

    def _local(self, target, task_ids):
        if isinstance(target, list):
            return [
                to_local_targets(t.to(self.device, non_blocking=True), task_ids, self.local_table)
                for t in target
            ]
        return to_local_targets(target.to(self.device, non_blocking=True), task_ids, self.local_table)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        task_ids = self.task_ids(batch["keys"])
        target = self._local(batch["target"], task_ids)
        # the local logits of each sample's task
        return optimizer_step(
            self, lambda: call_with_tasks(self.loss, self.network(data, task_ids), target, task_ids)
        )

    def validation_step(self, batch: dict) -> dict:
        """Sliced loss and the pseudo Dice of each sample's own task, counted per global label over the samples
        whose task segments it."""
        data = batch["data"].to(self.device, non_blocking=True)
        task_ids = self.task_ids(batch["keys"])
        global_target = batch["target"]
        target = self._local(global_target, task_ids)
        with autocast_for(self):
            output = self.network(data, task_ids)
            del data
            loss = call_with_tasks(self.loss, output, target, task_ids)
        if isinstance(output, list):
            output, target = output[0], target[0]
        valid = per_scale_loss(self.loss).class_valid.to(output.device)[task_ids]
        shape = (*valid.shape, *([1] * (output.ndim - 2)))
        pred = torch.where(
            valid.view(shape), output.float(), torch.full_like(output, -1e4, dtype=torch.float32)
        )
        pred = pred.argmax(1)  # (B, ...) local classes
        tgt = target[:, 0].long()
        ignore = self.label_manager.ignore_label
        mask = (tgt != ignore) if ignore is not None else torch.ones_like(tgt, dtype=torch.bool)
        num_fg = self.label_manager.num_segmentation_heads - 1
        tp, fp, fn = np.zeros(num_fg), np.zeros(num_fg), np.zeros(num_fg)
        for b in range(pred.shape[0]):
            labs = self.task_layout.labels[int(task_ids[b])]
            for j, lab in enumerate(labs):
                p = (pred[b] == j + 1) & mask[b]
                t = (tgt[b] == j + 1) & mask[b]
                tp[lab - 1] += float((p & t).sum())
                fp[lab - 1] += float((p & ~t).sum())
                fn[lab - 1] += float((~p & t).sum())
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}
