"""KiTS21 Dice and surface Dice at parity with the official evaluation.

``data/parity/kits21_official.json`` holds the numbers of ``compute_metrics_for_case`` of the kits21 repository's
``kits21/evaluation/metrics.py`` (MedPy ``dc`` + DeepMind ``compute_surface_distances``, the HEC classes and
``HEC_SD_TOLERANCES_MM``; repositories and commits in the fixture) on the volumes :func:`kits_cases` writes.
The official code is not a dependency of this package or of its tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.paths import DATA
from support.volumes import ball, write_label

from nnunet_ext.challenges.evaluate import evaluate_folders

FIXTURE = DATA / "parity" / "kits21_official.json"


def kits_reference(shape, spacing, cyst=True):
    ref = np.zeros(shape, np.uint8)
    ref[ball(shape, (shape[0] // 2, 20, 18), 12.0, spacing)] = 1  # kidney
    ref[ball(shape, (shape[0] // 2, 22, 24), 5.0, spacing)] = 2  # tumour
    if cyst:
        ref[ball(shape, (shape[0] // 2, 14, 14), 3.0, spacing)] = 3
    return ref


def kits_cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    """``{case: (prediction, reference, spacing (z, y, x))}``: shifted, eroded and missing classes, a cyst
    predicted as tumour, empty classes, anisotropic spacing."""
    from scipy import ndimage

    cases = {}
    for name, shape, spacing in (
        ("aniso", (14, 40, 40), (2.5, 0.8, 0.8)),
        ("iso", (30, 40, 40), (1.0, 1.0, 1.0)),
    ):
        ref = kits_reference(shape, spacing)
        cases[f"case_{name}_shift"] = (np.roll(ref, 1, axis=2), ref, spacing)
        eroded = ref.copy()
        eroded[ref == 1] = 0
        eroded[ndimage.binary_erosion(ref == 1)] = 1
        eroded[eroded == 3] = 2  # cyst predicted as tumour: masses right, tumour wrong
        cases[f"case_{name}_eroded"] = (eroded, ref, spacing)
        no_tumour = ref.copy()
        no_tumour[no_tumour == 2] = 1  # tumour missed
        cases[f"case_{name}_missed"] = (no_tumour, ref, spacing)
        without = kits_reference(shape, spacing, cyst=False)
        without[without == 2] = 1  # a reference without masses, a prediction with them
        cases[f"case_{name}_fp"] = (ref, without, spacing)
        cases[f"case_{name}_both_empty"] = (without, without, spacing)  # masses and tumour absent from both
    return cases


def test_kits21_matches_the_official_evaluation(tmp_path):
    fixture = json.loads(FIXTURE.read_text())
    for case, (pred, ref, spacing) in kits_cases().items():
        write_label(tmp_path / "pred" / f"{case}.nii.gz", pred, spacing)
        write_label(tmp_path / "gt" / f"{case}.nii.gz", ref, spacing)
    results = evaluate_folders("kits21", tmp_path / "pred", tmp_path / "gt")["cases"]
    assert set(results) == set(fixture["cases"])
    ours_to_official = {"kidney_and_masses": "kidney_and_mass", "masses": "mass", "tumour": "tumor"}
    for case, per_hec in fixture["cases"].items():
        for ours, official in ours_to_official.items():
            for metric, key in (("Dice", "Dice"), ("NSD", "SD")):
                expected = per_hec[official][key]
                assert results[case][ours][metric] == pytest.approx(expected, abs=1e-4), (case, ours, metric)
