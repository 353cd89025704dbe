"""Boundary targets computed on the device from (augmented) label maps, and nnU-Net's deep-supervision
downsampling reproduced in torch.

BA-Net's definition (arXiv 2208.13338; official code): a voxel is boundary iff the MINIMUM label in its 3x3x3
neighbourhood (3x3 in 2d) is lower than its own label. That is a one-voxel-thick inner boundary on the
higher-label side of every interface (foreground/background and between two foreground classes); volume borders
are padded by replication, so an object touching the patch border has no boundary there. The result is
binarised to {0, 1}.

Ignore label: voxels carrying the ignore label keep that value in the boundary target, so a loss built with
``ignore_label`` skips them. The ignore label is nnU-Net's highest label, so it never lowers a neighbour's minimum:
a labelled voxel next to an unlabelled (ignore) region is not made boundary by it.

All functions work on batched tensors ``(B, 1, *spatial)`` (2 or 3 spatial dims) of any integer or float dtype
and return the input's dtype and device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def boundary_target(label: torch.Tensor, ignore_label: int | None = None) -> torch.Tensor:
    """BA-Net boundary map of a label map.

    Args:
        label: ``(B, 1, X, Y[, Z])`` label map (nnU-Net's segmentation target, -1 already removed).
        ignore_label: nnU-Net's ignore label (``label_manager.ignore_label``) or None. Must not be 0 or 1 (those
            are the boundary classes).

    Returns:
        Tensor like ``label``: 1 on boundary voxels, 0 elsewhere, ``ignore_label`` where ``label == ignore_label``.
    """
    if label.ndim not in (4, 5) or label.shape[1] != 1:
        raise ValueError(f"label must have shape (B, 1, X, Y[, Z]), got {tuple(label.shape)}")
    if ignore_label is not None and ignore_label in (0, 1):
        raise ValueError(f"ignore_label {ignore_label} collides with the boundary classes 0/1")
    spatial = label.ndim - 2
    x = label.float()
    # replication padding by one voxel on every side, then a min filter (= -max_pool(-x)) of size 3
    x_pad = F.pad(x, (1, 1) * spatial, mode="replicate")
    pool = F.max_pool3d if spatial == 3 else F.max_pool2d
    neighbourhood_min = -pool(-x_pad, kernel_size=3, stride=1)
    boundary = (neighbourhood_min < x).to(label.dtype)
    if ignore_label is not None:
        boundary = torch.where(label == ignore_label, label, boundary)
    return boundary


def downsample_like_nnunet(seg: torch.Tensor, scale: Sequence[float] | float) -> torch.Tensor:
    """One scale of batchgeneratorsv2's ``DownsampleSegForDSTransform`` (used by
    ``nnUNetTrainer.get_training_transforms``), batched: shape ``round(size * scale)`` per axis, ``nearest-exact``
    interpolation in float, cast back to the input dtype; a scale of all ones returns the input unchanged."""
    spatial = seg.ndim - 2
    if not isinstance(scale, (tuple, list)):
        scale = [scale] * spatial
    if len(scale) != spatial:
        raise ValueError(f"scale {scale} does not match the {spatial} spatial dims of {tuple(seg.shape)}")
    if all(s == 1 for s in scale):
        return seg
    new_shape = [round(i * j) for i, j in zip(seg.shape[2:], scale)]
    return F.interpolate(seg.float(), new_shape, mode="nearest-exact").to(seg.dtype)


def downsample_for_deep_supervision(
    seg: torch.Tensor, deep_supervision_scales: Sequence[Sequence[float] | float] | None
) -> list[torch.Tensor] | torch.Tensor:
    """nnU-Net's deep-supervision target list for ``seg`` (full resolution first), computed on ``seg``'s device.

    ``deep_supervision_scales`` is ``nnUNetTrainer._get_deep_supervision_scales()``; None (deep supervision
    off) returns ``seg`` itself, as nnU-Net then passes a tensor instead of a list."""
    if deep_supervision_scales is None:
        return seg
    return [downsample_like_nnunet(seg, s) for s in deep_supervision_scales]


def boundary_targets_for_deep_supervision(
    label: torch.Tensor,
    deep_supervision_scales: Sequence[Sequence[float] | float] | None,
    ignore_label: int | None = None,
) -> list[torch.Tensor] | torch.Tensor:
    """Boundary targets for every deep-supervision output: the boundary map of the full-resolution label,
    downsampled exactly as nnU-Net downsamples the segmentation target (so each scale equals what
    ``DownsampleSegForDSTransform`` would give on the full-resolution boundary map)."""
    return downsample_for_deep_supervision(boundary_target(label, ignore_label), deep_supervision_scales)
