"""Hand-made volumes for the parity tests: balls on anisotropic grids, written as label files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ball of ``radius`` mm around ``centre`` (voxel index, z y x) on a grid of ``spacing`` (z y x)."""
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius**2


def write_label(path: Path, array: np.ndarray, spacing_zyx) -> None:
    """``array`` as a uint8 label file with spacing ``spacing_zyx`` (z y x; SimpleITK takes x y z)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))
