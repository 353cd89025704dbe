"""Surface metrics at parity with their reference implementations, on hand-made volumes.

``data/parity/surface_distance_official.json`` holds the numbers of DeepMind's surface-distance
(``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``, repository and commit in the fixture)
on the mask pairs that :func:`surface_cases` builds: normalised surface Dice at tolerances equal to a grid
distance (the float32 regression: MONAI's distances are float32), anisotropic spacing, shifted and eroded
shapes. ``data/parity/medpy_official.json`` holds MedPy 0.5.2's ``hd``, ``hd95``, ``assd`` and ``asd`` (both
directions) on those pairs and on :func:`medpy_cases`. The reference code is not a dependency of this package or of
its tests.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from support.paths import DATA
from support.volumes import ball

from nnunet_ext.core.metrics import distance_metrics, normalized_surface_dice, surface_distances

FIXTURE = DATA / "parity" / "surface_distance_official.json"
MEDPY = DATA / "parity" / "medpy_official.json"


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


def medpy_cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Further ``{name: (prediction, reference, spacing (z, y, x))}`` for the MedPy distances: surfaces of very
    different sizes (the pooled ASSD differs from the average of the two directed means), an object on the
    image border (MedPy erodes with a background border, so the edge voxels are surface), a one-voxel plate."""
    shape, spacing = (16, 40, 40), (2.5, 0.8, 0.8)
    cases = {}
    cases["small_in_large_aniso"] = (
        ball(shape, (8, 20, 20), 5.0, spacing),
        ball(shape, (8, 20, 20), 11.0, spacing),
        spacing,
    )
    ref = np.zeros(shape, bool)
    ref[4:12, 0:14, 5:25] = True  # on the image border along y
    cases["on_the_border_aniso"] = (np.roll(ref, 3, axis=2), ref, spacing)
    plate = np.zeros(shape, bool)
    plate[7, 10:30, 10:30] = True  # one voxel thick: all of it is surface
    cases["plate_shifted_aniso"] = (np.roll(plate, 1, axis=0), plate, spacing)
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


def test_hausdorff_hd95_and_assd_match_medpy():
    """HD, HD95_pooled (MedPy's hd95: both directions pooled) and ASSD equal MedPy 0.5.2 with anisotropic spacing,
    and so do the two directed mean distances (MedPy's asd)."""
    fixture = json.loads(MEDPY.read_text())
    assert len(fixture["source"]["commit"]) == 40 and fixture["source"]["repository"].endswith("loli/medpy")
    cases = {**{k: v[:3] for k, v in surface_cases().items()}, **medpy_cases()}
    assert set(cases) == set(fixture["cases"])
    for name, (pred, ref, spacing) in cases.items():
        expected = fixture["cases"][name]
        ours = distance_metrics(pred, ref, spacing)
        for metric, key in (("HD", "hd"), ("HD95_pooled", "hd95"), ("ASSD", "assd")):
            assert ours[metric] == pytest.approx(expected[key], abs=1e-4), (
                name,
                metric,
                ours[metric],
                expected[key],
            )
        d_pg, d_gp, _, _ = surface_distances(pred, ref, spacing)
        assert d_pg.mean() == pytest.approx(expected["asd"], abs=1e-4), name
        assert d_gp.mean() == pytest.approx(expected["asd_reverse"], abs=1e-4), name


def test_medpy_assd_pools_the_two_directions():
    """What docs/challenges/README.md says: MedPy 0.5.2's assd is the mean of both directions' distances pooled,
    not the average of the two directed means (they differ when the surfaces have different sizes)."""
    cases = json.loads(MEDPY.read_text())["cases"]
    differ = [n for n, c in cases.items() if abs(c["assd"] - (c["asd"] + c["asd_reverse"]) / 2) > 1e-3]
    assert {"small_in_large_aniso", "cube_eroded_iso08"} <= set(differ)


def test_amos22_nsd_through_evaluate_equals_deepmind_at_its_assumed_1mm(tmp_path):
    """`evaluate --challenge amos22-task1` scores an organ's NSD at the assumed 1 mm tolerance as DeepMind's code
    does (fixture), on anisotropic label files; the assumed empty-mask values: absent from both 1, from one 0."""
    from support.volumes import write_label

    from nnunet_ext.challenges.evaluate import evaluate_folders

    fixture = json.loads(FIXTURE.read_text())["cases"]
    expected = {}
    for name, (pred, ref, spacing, tolerances) in surface_cases().items():
        if 1.0 not in tolerances:
            continue
        expected[name] = fixture[name]["nsd"][tolerances.index(1.0)]
        liver = 6
        write_label(tmp_path / "pred" / f"{name}.nii.gz", pred * liver, spacing)
        write_label(tmp_path / "gt" / f"{name}.nii.gz", ref * liver, spacing)
    write_label(tmp_path / "pred" / "missed.nii.gz", np.zeros((12, 12, 12)), (2.5, 0.8, 0.8))
    write_label(
        tmp_path / "gt" / "missed.nii.gz", surface_cases()["cube_eroded_aniso"][1] * 6, (2.5, 0.8, 0.8)
    )
    assert len(expected) >= 4
    cases = evaluate_folders("amos22-task1", tmp_path / "pred", tmp_path / "gt")["cases"]
    for name, value in expected.items():
        assert cases[name]["liver"]["NSD"] == pytest.approx(value, abs=1e-4), name
        assert cases[name]["spleen"] == {"Dice": 1.0, "NSD": 1.0}  # absent from both (assumed)
    assert cases["missed"]["liver"] == {"Dice": 0.0, "NSD": 0.0}  # absent from the prediction (assumed)
