"""Losses shared by nnunet_ext's trainers.

They wrap nnU-Net's own losses (``DC_and_CE_loss``, ``DeepSupervisionWrapper``, built by
``nnUNetTrainer._build_loss``) instead of re-implementing them, so deep-supervision weights, the ignore label,
batch Dice and DDP behave exactly as in nnU-Net.
"""

from __future__ import annotations

import torch
from torch import nn


class BoundaryAwareLoss(nn.Module):
    """BA-Net's compound loss (arXiv 2208.13338):
    ``seg_loss(seg_output, seg_target) + boundary_weight * boundary_loss(boundary_output, boundary_target)``.

    ``seg_loss`` and ``boundary_loss`` are nnU-Net losses (typically Dice+CE, each wrapped in nnU-Net's
    ``DeepSupervisionWrapper`` when deep supervision is on: outputs and targets are then lists, full resolution
    first). The paper weights both terms 1:1; its consistency loss is switched off in the official code and is not
    implemented here.
    """

    def __init__(self, seg_loss: nn.Module, boundary_loss: nn.Module, boundary_weight: float = 1.0):
        super().__init__()
        self.seg_loss = seg_loss
        self.boundary_loss = boundary_loss
        self.boundary_weight = float(boundary_weight)

    def forward(self, seg_output, seg_target, boundary_output, boundary_target) -> torch.Tensor:
        loss = self.seg_loss(seg_output, seg_target)
        if self.boundary_weight != 0:
            loss = loss + self.boundary_weight * self.boundary_loss(boundary_output, boundary_target)
        return loss
