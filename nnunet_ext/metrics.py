"""Segmentation metrics per structure, with surface distances from MONAI (a maintained library).

Conventions (documented because challenges differ; the challenge-specific ones live with the converters):

* Dice: ``2|P∩G| / (|P| + |G|)``; both empty -> NaN (nothing to score, as nnU-Net's evaluation does);
* HD95: MONAI ``compute_hausdorff_distance(percentile=95)`` in millimetres with the image spacing
  (symmetric, surface voxels); both empty -> 0.0; exactly one empty -> ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    denominator = pred.sum() + gt.sum()
    if denominator == 0:
        return math.nan
    return float(2 * np.logical_and(pred, gt).sum() / denominator)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile symmetric Hausdorff distance in mm (``spacing`` in the arrays' axis order)."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return math.inf
    value = compute_hausdorff_distance(
        torch.from_numpy(pred[None, None]),
        torch.from_numpy(gt[None, None]),
        percentile=95,
        spacing=[float(s) for s in spacing],
    )
    return float(value.item())


def per_structure(pred: np.ndarray, gt: np.ndarray, labels: dict[str, int], spacing: Sequence[float]) -> dict:
    """``{name: {"Dice": ..., "HD95": ...}}`` for each label (value) of ``labels``."""
    return {
        name: {"Dice": dice(pred == value, gt == value), "HD95": hd95(pred == value, gt == value, spacing)}
        for name, value in labels.items()
    }
