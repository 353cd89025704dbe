"""Downstream fine-tuning from a UniSeg model (Ye et al., MICCAI 2023): plain nnU-Net on the paper's schedule.

    nnunet-ext uniseg convert-checkpoint -i UNISEG_MODEL/fold_0/checkpoint_final.pth -o uniseg_pretrained.pth
    nnUNetv2_train DOWNSTREAM 3d_fullres 0 -tr nnUNetTrainerUniSegFT -pretrained_weights uniseg_pretrained.pth

The converted checkpoint is a plain nnU-Net network (prompt and fusion dropped, the prompt channel removed
from the first decoder stage, the stem of the chosen modality group kept); nnU-Net's ``-pretrained_weights``
loads everything but the segmentation layers. See docs/uniseg.md.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerUniSegFT(nnUNetTrainer):
    """nnU-Net's trainer with UniSeg's downstream schedule: 100 epochs x 250 iterations (the paper's BTCV and
    vestibular-schwannoma fine-tuning); network, loss, SGD (lr 1e-2, poly) and data pipeline are nnU-Net's."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100
        self.num_iterations_per_epoch = 250
