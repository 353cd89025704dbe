"""Test helpers (moved from tests/challenges/test_evaluate.py): write_sheared."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_sheared(path: Path, array_xyz: np.ndarray) -> None:
    """A NIfTI with non-orthonormal direction cosines (as some AMOS files): SimpleITK refuses to read it."""
    import nibabel

    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[0, 1] = 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array_xyz.astype(np.uint8), affine), str(path))
