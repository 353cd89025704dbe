"""Surface metrics at parity with their reference implementations, on hand-made volumes.

``data/parity/surface_distance_official.json`` holds the numbers of DeepMind's surface-distance
(``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``, repository and commit in the fixture)
on the mask pairs that :func:`surface_cases` builds: normalised surface Dice at tolerances equal to a grid
distance (the float32 regression: MONAI's distances are float32), anisotropic spacing, shifted and eroded
shapes. The reference code is not a dependency of this package or of its tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nnunet_ext.metrics import normalized_surface_dice
from tests.volumes import ball

FIXTURE = Path(__file__).parent / "data" / "parity" / "surface_distance_official.json"


def surface_cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...], list[float]]]:
    """``{name: (prediction, reference, spacing (z, y, x), tolerances in mm)}``."""
    cases = {}
    cube = np.zeros((12, 12, 12), bool)
    cube[2:10, 2:10, 2:10] = True
    eroded = ndimage.binary_erosion(cube)
    diag = math.sqrt(2 * 0.8**2)
    cases["cube_eroded_iso08"] = (eroded, cube, (0.8, 0.8, 0.8), [0.0, 0.5, 0.8, diag, 1.0, 1.6])
    cases["cube_eroded_aniso"] = (eroded, cube, (2.5, 0.8, 0.8), [0.8, 1.0, 2.5, math.sqrt(2.5**2 + 0.8**2)])
    shape, spacing = (16, 40, 40), (2.5, 0.8, 0.8)
    ref = ball(shape, (8, 20, 20), 11.0, spacing)
    shifted = np.roll(ref, 2, axis=2)
    cases["ball_shift_aniso"] = (shifted, ref, spacing, [0.8, 1.0, 1.6, 2.5])
    grown = ball(shape, (8, 20, 20), 13.0, spacing) & ~ball(shape, (3, 20, 20), 3.0, spacing)
    cases["ball_grown_hole_aniso"] = (grown, ref, spacing, [1.0, 2.0, 2.5, 5.0])
    two = np.zeros((10, 24, 24), bool)
    two[3:7, 3:9, 3:9] = True
    one = two.copy()
    two[3:7, 14:20, 14:20] = True  # a false positive component
    cases["extra_component"] = (two, one, (1.0, 1.0, 1.0), [1.0, 2.0])
    return cases


def test_normalized_surface_dice_matches_deepmind():
    fixture = json.loads(FIXTURE.read_text())
    cases = surface_cases()
    assert set(cases) == set(fixture["cases"])
    for name, (pred, ref, spacing, tolerances) in cases.items():
        expected = fixture["cases"][name]["nsd"]
        assert len(expected) == len(tolerances)
        for tolerance, value in zip(tolerances, expected):
            ours = normalized_surface_dice(pred, ref, spacing, tolerance)
            assert ours == pytest.approx(value, abs=1e-4), (name, tolerance, ours, value)


def test_nsd_at_a_tolerance_equal_to_the_grid_distance():
    """The regression of the float32 comparison: a cube against its 1-voxel erosion at spacing 0.8 and
    tolerance 0.8 scored 0.000 (MONAI's float32 0.8 compared as 0.80000001 > 0.8) instead of DeepMind's."""
    pred, ref, spacing, _ = surface_cases()["cube_eroded_iso08"]
    value = json.loads(FIXTURE.read_text())["cases"]["cube_eroded_iso08"]["nsd"][2]
    assert value > 0.8  # most of both surfaces lie within one voxel (0.8 mm) of the other
    assert normalized_surface_dice(pred, ref, spacing, 0.8) == pytest.approx(value, abs=1e-4)
