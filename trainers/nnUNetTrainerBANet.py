"""BA-Net (Boundary-Aware Network; arXiv 2208.13338, 2208.13774) as an nnU-Net v2 trainer.

``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerBANet`` on unedited nnU-Net plans (PlainConvUNet or
ResidualEncoderUNet kwargs, 2d or 3d). See docs/banet.md.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ext.architectures.banet import BANet
from nnunet_ext.architectures.from_plans import method_network_from_plans
from nnunet_ext.banet.boundary_targets import boundary_targets_for_deep_supervision
from nnunet_ext.banet.loss import BoundaryAwareLoss
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.train_step import batch_to_device, optimizer_step

BANET_CLASS_NAME = "nnunet_ext.architectures.banet.BANet"


class nnUNetTrainerBANet(nnUNetTrainer):
    """nnU-Net's trainer with BA-Net's network and loss; everything else (data, augmentation, schedule,
    validation, checkpoints, inference) is nnU-Net's.

    * network: :class:`nnunet_ext.architectures.banet.BANet` built from the plans' architecture kwargs, whatever
      ``network_class_name`` the plans name;
    * loss: nnU-Net's Dice+CE with deep supervision on the segmentation output + ``boundary_weight`` x the same
      Dice+CE (same deep-supervision weights, same ignore label) on the 2-channel boundary output; boundary targets
      are computed on the device from the augmented full-resolution label (see :mod:`nnunet_ext.banet.boundary_targets`).
    """

    #: weight of the boundary loss relative to the segmentation loss (the paper: 1:1). Change in a subclass.
    boundary_weight: float = 1.0

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise UserError(
                f"{type(self).__name__} computes boundary targets from label maps, but this dataset uses "
                f"region-based training (dataset.json 'regions_class_order'). Train BA-Net on a label-based "
                f"dataset.json (no regions)."
            )
        if self.label_manager.ignore_label is not None and self.label_manager.ignore_label < 2:
            raise UserError(
                f"The ignore label {self.label_manager.ignore_label} collides with the boundary classes 0/1; "
                f"BA-Net needs at least one foreground label below the ignore label in dataset.json."
            )
        self.banet_loss: BoundaryAwareLoss | None = None  # -> initialize

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """BANet from the configuration's architecture kwargs (PlainConvUNet-, ResidualEncoderUNet- or
        BANet-style plans). Called at training AND inference (nnUNetPredictor), with nnU-Net's initialisation."""
        return method_network_from_plans(
            "nnUNetTrainerBANet",
            BANET_CLASS_NAME,
            (BANet,),
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
        )

    # --------------------------------------------------------------------------------------------------- loss
    def initialize(self):
        super().initialize()  # builds self.loss: nnU-Net's segmentation loss (also used by validation_step)
        # the boundary loss is nnU-Net's default recipe for the 2-class boundary problem: Dice+CE (no background
        # Dice), the ignore label, batch Dice as planned, deep supervision with nnU-Net's weights
        self.banet_loss = BoundaryAwareLoss(self.loss, nnUNetTrainer._build_loss(self), self.boundary_weight)

    def boundary_targets(self, target):
        """Boundary targets of a batch target (a tensor, or nnU-Net's deep-supervision list): computed from the
        full-resolution augmented label and downsampled exactly like the segmentation targets."""
        if isinstance(target, (list, tuple)):
            boundary = boundary_targets_for_deep_supervision(
                target[0], self._get_deep_supervision_scales(), self.label_manager.ignore_label
            )
            if [b.shape for b in boundary] != [t.shape for t in target]:
                raise RuntimeError(
                    f"boundary target shapes {[tuple(b.shape) for b in boundary]} differ from the segmentation "
                    f"target shapes {[tuple(t.shape) for t in target]}"
                )
            return boundary
        return boundary_targets_for_deep_supervision(target, None, self.label_manager.ignore_label)

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(self, batch)
        boundary_target = self.boundary_targets(target)

        def loss():
            seg_output, boundary_output = self.network(data)  # training mode: (segmentation, boundary)
            return self.banet_loss(seg_output, target, boundary_output, boundary_target)

        return optimizer_step(self, loss)

    # validation_step, checkpoints, --val and inference are nnU-Net's: in eval mode BANet returns the
    # segmentation output only, exactly like a plain nnU-Net network (the val loss is the segmentation loss).
