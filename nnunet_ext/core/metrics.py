"""Segmentation metrics per structure, with surface distances from MONAI (a maintained library).

Conventions (documented because challenges differ; the challenge-specific ones live with the converters):

* Dice: ``2|P∩G| / (|P| + |G|)``; both empty -> NaN (nothing to score, as nnU-Net's evaluation does);
* HD95: MONAI ``compute_hausdorff_distance(percentile=95)`` in millimetres with the image spacing
  (symmetric, surface voxels); both empty -> 0.0; exactly one empty -> ``inf``.
* :func:`distance_metrics` (HD, HD95, MedPy-style pooled HD95, ASSD, AVD) and
  :func:`normalized_surface_dice` take MONAI's surfaces and distances and leave the empty-mask conventions
  to the caller (``nnunet_ext.challenges`` defines them per challenge).
"""

from __future__ import annotations

import math
import warnings
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
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
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


# ----------------------------------------------------------------------------------------- surface distances
# Everything below takes MONAI's surface extraction and nearest-surface distances
# (``monai.metrics.utils.get_edge_surface_distance``) and only aggregates them. Spacing is in the arrays' axis
# order (z, y, x for SimpleITK arrays); distances are in the spacing's unit (mm).


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], subvoxels: bool = False):
    """``(d_pred_to_gt, d_gt_to_pred, areas_pred, areas_gt)`` as numpy arrays, for two NON-EMPTY masks.

    ``subvoxels=False``: surfaces are the voxels removed by one binary erosion (MONAI's / MedPy's
    definition), areas are ``None``. ``subvoxels=True``: DeepMind surface-distance's surfels on the voxel
    corner grid, each with its surface area in mm^2 (the reference for normalised surface Dice).
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        (edges_pred, edges_gt), (d_pg, d_gp), areas = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred, dtype=bool)),
            torch.from_numpy(np.ascontiguousarray(gt, dtype=bool)),
            spacing=[float(s) for s in spacing],
            use_subvoxels=subvoxels,
            symmetric=True,
            warn_empty=False,
        )
    d_pg, d_gp = np.asarray(d_pg, np.float64), np.asarray(d_gp, np.float64)
    if not subvoxels:
        return d_pg, d_gp, None, None
    areas_pred, areas_gt = areas
    return (
        d_pg,
        d_gp,
        np.asarray(areas_pred[edges_pred], np.float64),
        np.asarray(areas_gt[edges_gt], np.float64),
    )


def distance_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95
) -> dict[str, float]:
    """Distance metrics of two NON-EMPTY masks from MONAI's surface distances (erosion surfaces):

    * ``HD``: Hausdorff distance, max over both directions;
    * ``HD95``: MONAI's definition, max of the two directed ``percentile``-th percentiles
      (what ``compute_hausdorff_distance(percentile=95)`` returns);
    * ``HD95_pooled``: MedPy's ``hd95`` definition, the percentile of both directions' distances pooled;
    * ``ASSD``: average symmetric surface distance, the mean of both directions' distances pooled (MedPy 0.5's
      ``assd`` and MONAI's ``compute_average_surface_distance(symmetric=True)`` both pool; it is not the average
      of the two directed means, which differs when the surfaces have different numbers of voxels);
    * ``AVD``: average Hausdorff distance, max of the two directed mean distances (Taha & Hanbury 2015).
    """
    d_pg, d_gp, _, _ = surface_distances(pred, gt, spacing)
    both = np.concatenate([d_pg, d_gp])
    return {
        "HD": float(both.max()),
        "HD95": float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile))),
        "HD95_pooled": float(np.percentile(both, percentile)),
        "ASSD": float(both.mean()),
        "AVD": float(max(d_pg.mean(), d_gp.mean())),
    }


def normalized_surface_dice(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float
) -> float:
    """Normalised surface Dice at ``tolerance`` (mm) of two NON-EMPTY masks: the surface area of each mask
    within ``tolerance`` of the other's surface over the total surface area (DeepMind's definition, surfels
    and areas from MONAI with ``use_subvoxels=True``)."""
    d_pg, d_gp, a_pred, a_gt = surface_distances(pred, gt, spacing, subvoxels=True)
    total = a_pred.sum() + a_gt.sum()
    if total == 0:
        return math.nan
    # MONAI's distances are float32: compare them with the tolerance rounded to float32 as well. In float64 a
    # distance equal to the tolerance (0.8 mm on a 0.8 mm grid) reads 0.80000001 > 0.8 and its surfel is lost.
    # Rounding is monotonic, so this keeps exactly the surfels whose exact distance is <= tolerance.
    tol = np.float64(np.float32(tolerance))
    return float((a_pred[d_pg <= tol].sum() + a_gt[d_gp <= tol].sum()) / total)
