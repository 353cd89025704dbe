"""`nnunet-ext evaluate`: challenge metrics on hand-made volumes with known answers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support.sheared import write_sheared  # noqa: F401

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import class_metrics
from nnunet_ext.challenges.evaluate import evaluate_folders
from nnunet_ext.cli import main
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.metrics import distance_metrics, normalized_surface_dice


def write(path: Path, array: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def box(shape, lo, hi, value=1, out=None):
    a = np.zeros(shape, np.uint8) if out is None else out
    a[tuple(slice(s, e) for s, e in zip(lo, hi))] = value
    return a


def test_distance_metrics_single_voxels_with_anisotropic_spacing():
    gt = box((10, 10, 10), (2, 2, 2), (3, 3, 3)).astype(bool)
    pred = box((10, 10, 10), (2, 2, 6), (3, 3, 7)).astype(bool)  # 4 voxels along x (1 mm): 4 mm
    pred[8, 2, 2] = True  # 6 voxels along z (2 mm): 12 mm
    d = distance_metrics(pred, gt, (2.0, 1.0, 1.0))
    # directed distances: pred -> gt [4, 12], gt -> pred [4]
    assert d["HD"] == 12.0
    assert math.isclose(d["ASSD"], (4 + 12 + 4) / 3)
    assert d["AVD"] == 8.0  # max(mean(4, 12), 4)
    assert math.isclose(d["HD95"], 4 + 0.95 * 8)  # max of the directed 95th percentiles (MONAI)
    assert math.isclose(d["HD95_pooled"], 4 + 0.9 * 8)  # 95th percentile of [4, 4, 12] (MedPy)


def test_shifted_cube_hausdorff_in_mm_and_surface_dice():
    shape = (20, 30, 20)
    gt = box(shape, (5, 5, 5), (10, 10, 10)).astype(bool)
    shifted = np.roll(gt, 2, axis=0)  # 2 slices of 3 mm
    assert distance_metrics(shifted, gt, (3.0, 1.0, 1.0))["HD"] == 6.0
    assert normalized_surface_dice(shifted, gt, (3.0, 1.0, 1.0), 6.0) == 1.0
    assert normalized_surface_dice(shifted, gt, (3.0, 1.0, 1.0), 2.0) < 1.0
    assert normalized_surface_dice(gt, gt, (1.0, 1.0, 1.0), 0.0) == 1.0
    # a second, far cube of the same size: its whole surface is wrong, the rest exact -> 2/3
    two = gt | box(shape, (5, 20, 5), (10, 25, 10)).astype(bool)
    assert math.isclose(normalized_surface_dice(two, gt, (1.0, 1.0, 1.0), 1.0), 2 / 3)


def test_empty_mask_conventions_per_challenge():
    shape = (4, 5, 6)
    empty = np.zeros(shape, bool)
    full = box(shape, (1, 1, 1), (3, 3, 3)).astype(bool)
    kits = get_challenge("kits21").rules
    assert class_metrics(empty, empty, (1, 1, 1), ("Dice", "NSD"), kits, 1.0) == {"Dice": 1.0, "NSD": 1.0}
    assert class_metrics(empty, full, (1, 1, 1), ("Dice", "NSD"), kits, 1.0) == {"Dice": 0.0, "NSD": 0.0}
    kipa = get_challenge("kipa22").rules  # HD / AVD of empty masks: tests/challenges/test_parity_kipa22.py
    assert class_metrics(full, empty, (2.0, 1.0, 1.0), ("Dice",), kipa, None) == {"Dice": 0.0}
    assert math.isnan(class_metrics(empty, empty, (1, 1, 1), ("Dice",), kipa, None)["Dice"])
    mots = get_challenge("mots").rules
    assert class_metrics(empty, full, (1, 1, 1), ("Dice", "HD95_pooled"), mots, None) == {
        "Dice": 0.0,
        "HD95_pooled": 373.12866,
    }
    assert class_metrics(empty, empty, (1, 1, 1), ("HD95_pooled",), mots, None) == {"HD95_pooled": 0.0}
    half = box(shape, (1, 1, 1), (2, 3, 3)).astype(bool)  # 4 of the 8 voxels
    assert class_metrics(half, full, (1, 1, 1), ("Dice",), mots, None)["Dice"] == 2 * 4 / (4 + 8 + 1)


def kits_case():
    gt = box((8, 10, 10), (1, 1, 1), (7, 9, 9), 1)  # kidney
    box((8, 10, 10), (2, 2, 2), (4, 4, 4), 2, gt)  # tumour, 8 voxels
    box((8, 10, 10), (4, 5, 5), (6, 7, 7), 3, gt)  # cyst, 8 voxels
    pred = gt.copy()
    pred[pred == 3] = 2  # cyst predicted as tumour
    return pred, gt


def test_kits21_hierarchical_classes_via_cli(tmp_path, capsys):
    pred, gt = kits_case()
    write(tmp_path / "gt" / "case_00001.nii.gz", gt, (0.8, 0.8, 3.0))
    write(tmp_path / "pred" / "case_00001.nii.gz", pred, (0.8, 0.8, 3.0))
    empty_gt = np.zeros_like(gt)
    write(tmp_path / "gt" / "case_00002.nii.gz", empty_gt)
    write(tmp_path / "pred" / "case_00002.nii.gz", empty_gt)
    write(tmp_path / "pred" / "case_00003.nii.gz", empty_gt)  # no reference: ignored, reported
    rc = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--challenge", "kits21", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "kidney_and_masses" in out and "tumour" in out and "ignored 1 predictions" in out
    res = json.loads((tmp_path / "pred" / "kits21_metrics.json").read_text())
    c1 = res["cases"]["case_00001"]
    assert c1["kidney_and_masses"] == {"Dice": 1.0, "NSD": 1.0}
    assert c1["masses"] == {"Dice": 1.0, "NSD": 1.0}
    assert math.isclose(c1["tumour"]["Dice"], 2 * 8 / (16 + 8)) and c1["tumour"]["NSD"] < 1
    assert res["cases"]["case_00002"]["tumour"] == {"Dice": 1.0, "NSD": 1.0}  # both empty -> 1 (KiTS21)
    assert math.isclose(res["mean"]["tumour"]["Dice"], (2 / 3 + 1) / 2)
    assert res["conventions"]["nsd_tolerance_mm"] == {
        "kidney_and_masses": 1.0330772532390826,  # the kits21 repository's HEC_SD_TOLERANCES_MM
        "masses": 1.1328796488598762,
        "tumour": 1.1498198361434828,
    }
    rows = list(csv.reader((tmp_path / "pred" / "kits21_metrics.csv").open()))
    assert rows[0] == ["case", "class", "Dice", "NSD"] and len(rows) == 1 + 6 + 3
    assert rows[-1][:2] == ["mean", "tumour"]
    # existing output is refused without --overwrite; missing predictions are an error
    assert (
        main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--challenge", "kits21", "--quiet"])
        == 1
    )
    assert "pass --overwrite to overwrite it" in capsys.readouterr().err  # the option evaluate has
    (tmp_path / "pred" / "case_00002.nii.gz").unlink()
    with pytest.raises(UserError, match=r"1 reference cases have no prediction.*case_00002"):
        evaluate_folders("kits21", tmp_path / "pred", tmp_path / "gt")
    part = evaluate_folders("kits21", tmp_path / "pred", tmp_path / "gt", only_predicted=True)
    assert list(part["cases"]) == ["case_00001"] and part["references_without_prediction"] == ["case_00002"]


def test_spacing_conventions_kipa_mm_versus_mots_voxels(tmp_path):
    gt = box((12, 10, 10), (3, 3, 3), (7, 7, 7), 1)
    pred = np.roll(gt, 2, axis=0)  # 2 slices
    write(tmp_path / "gt" / "liver_3.nii.gz", gt, (1.0, 1.0, 2.5))
    write(tmp_path / "pred" / "liver_3.nii.gz", pred, (1.0, 1.0, 2.5))
    kipa = evaluate_folders("kipa22", tmp_path / "pred", tmp_path / "gt", metrics=["HD"])
    assert kipa["cases"]["liver_3"]["vein"]["HD"] == 5.0  # 2 slices x 2.5 mm
    mots = evaluate_folders("mots-liver", tmp_path / "pred", tmp_path / "gt")
    organ = mots["cases"]["liver_3"]["liver_organ"]
    assert organ["HD95_pooled"] == 3.0  # voxels of DoDNet's 1.5 mm grid: 5 mm = 3.3 slices
    assert mots["cases"]["liver_3"]["liver_tumour"] == {"Dice": 0.0, "HD95_pooled": 0.0}  # both empty


def test_mots_merged_dataset_scores_each_case_with_its_task(tmp_path):
    labels = get_challenge("mots").labels
    assert labels["liver_tumour"] == 2 and labels["hepatic_vessel"] == 5 and labels["spleen"] == 11
    gt = box((6, 8, 8), (1, 1, 1), (5, 7, 7), labels["hepatic_vessel"])
    box((6, 8, 8), (2, 2, 2), (4, 4, 4), labels["hepatic_vessel_tumour"], gt)
    pred = gt.copy()
    pred[0, 0, 0] = labels["liver"]  # another task's structure: not scored in a hepatic vessel case
    write(tmp_path / "gt" / "hepaticvessel_hepaticvessel_001.nii.gz", gt)
    write(tmp_path / "pred" / "hepaticvessel_hepaticvessel_001.nii.gz", pred)
    res = evaluate_folders("mots", tmp_path / "pred", tmp_path / "gt")
    case = res["cases"]["hepaticvessel_hepaticvessel_001"]
    assert set(case) == {"hepaticvessel_organ", "hepaticvessel_tumour"}
    from nnunet_ext.challenges.mots import dodnet_grid

    # the organ of hepatic vessel = the vessel only, counted on DoDNet's grid (source values: 1 vessel, 2 tumour)
    source = (gt == labels["hepatic_vessel"]) + 2 * (gt == labels["hepatic_vessel_tumour"])
    n_vessel = int((dodnet_grid(source.astype(np.uint8), (1.0, 1.0, 1.0)) == 1).sum())
    assert case["hepaticvessel_organ"]["Dice"] == 2 * n_vessel / (2 * n_vessel + 1)
    write(tmp_path / "gt" / "brain_001.nii.gz", gt)
    write(tmp_path / "pred" / "brain_001.nii.gz", gt)
    with pytest.raises(UserError, match="no MOTS task prefix"):
        evaluate_folders("mots", tmp_path / "pred", tmp_path / "gt")


def test_cosmos22_leaves_out_unannotated_slices(tmp_path):
    gt = np.full((5, 8, 8), 4, np.uint8)  # ignore everywhere but slice 2
    gt[2] = 0
    gt[2, 2:5, 2:5] = 2
    gt[2, 3, 3] = 1
    pred = np.zeros_like(gt)
    pred[:, 2:5, 2:5] = 3  # atherosclerotic on every slice (only slice 2 counts)
    pred[:, 3, 3] = 1
    write(tmp_path / "gt" / "c1_L.nii.gz", gt)
    write(tmp_path / "pred" / "c1_L.nii.gz", pred)
    res = evaluate_folders("cosmos22", tmp_path / "pred", tmp_path / "gt")["cases"]["c1_L"]
    assert res["lumen"]["Dice"] == 1.0 and res["wall"]["Dice"] == 1.0
    assert res["normal_wall"]["Dice"] == 0.0 and res["atherosclerotic_wall"]["Dice"] == 0.0


def test_files_simpleitk_refuses_are_read_with_nibabel(tmp_path):
    gt = box((10, 10, 12), (3, 3, 3), (7, 7, 7), 6)  # nibabel order (x, y, z); 6 = liver
    write_sheared(tmp_path / "gt" / "amos_0001.nii.gz", gt)
    write_sheared(tmp_path / "pred" / "amos_0001.nii.gz", np.roll(gt, 2, axis=2))  # 2 slices of 2.5 mm
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(tmp_path / "gt" / "amos_0001.nii.gz"))
    res = evaluate_folders("amos22-task1", tmp_path / "pred", tmp_path / "gt", metrics=["Dice", "HD"])
    liver = res["cases"]["amos_0001"]["liver"]
    assert liver["HD"] == 5.0 and liver["Dice"] == 0.5


def test_help_lists_the_values_assumed_without_an_official_definition(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "values we assume where no official definition was found" in out
    assert "amos22-task1, amos22-task2, amos22-mri: NSD tolerance 1 mm" in out
    assert "cosmos22: QuanM" in out and "cosmos22: Dice of empty masks" in out
    assert "amos22-task1, amos22-task2, amos22-mri: empty masks: absent from both -> Dice 1, NSD 1" in out
    assert "kipa22: a structure the reference lacks (the official code crashes)" in out
    written = get_challenge("amos22-task1").rules.to_json()  # the metrics JSON's "conventions"
    assert any("1 mm" in a for a in written["assumed_without_official_definition"])


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "1 reference cases have no prediction in"),
        ("label", "c2: the prediction holds label values [7] that KiPA22 does not define"),
        ("reference_label", "c2: the reference holds label values [9]"),
        ("spacing", "c2: prediction spacing"),
        ("shape", "c2: prediction shape"),
    ],
)
def test_bad_input_is_refused_naming_the_case_and_fix(tmp_path, capsys, problem, message):
    ok = box((10, 12, 12), (2, 2, 2), (6, 8, 8), 2)
    for case in ("c1", "c2"):
        write(tmp_path / "gt" / f"{case}.nii.gz", ok)
        write(tmp_path / "pred" / f"{case}.nii.gz", ok)
    if problem == "missing":
        (tmp_path / "pred" / "c2.nii.gz").unlink()
    elif problem == "label":
        write(tmp_path / "pred" / "c2.nii.gz", box((10, 12, 12), (0, 0, 0), (1, 1, 1), 7, ok.copy()))
    elif problem == "reference_label":
        write(tmp_path / "gt" / "c2.nii.gz", box((10, 12, 12), (0, 0, 0), (1, 1, 1), 9, ok.copy()))
    elif problem == "spacing":
        write(tmp_path / "pred" / "c2.nii.gz", ok, (1.0, 1.0, 2.0))
    else:
        write(tmp_path / "pred" / "c2.nii.gz", ok[:-1])
    before = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert (
        main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--challenge", "kipa22", "--quiet"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == before  # no metrics file written


#: challenge -> (a case, the case that goes wrong, a label value it defines, one it does not)
BAD_INPUT_CASES = {
    "kipa22": ("c1", "c2", 2, 9),
    "kits21": ("case_00001", "case_00002", 1, 7),
    "amos22-task1": ("amos_0001", "amos_0002", 6, 16),
    "amos22-task2": ("amos_0001", "amos_0601", 6, 16),
    "cosmos22": ("1_L", "1_R", 1, 5),  # 4, the ignore label, is refused in a prediction
    "mots": ("liver_1", "kidney_2", 3, 15),
    "mots-liver": ("liver_1", "liver_2", 1, 3),
    "mots-colon": ("colon_1", "colon_2", 1, 2),
}


@pytest.mark.parametrize(
    "challenge, problem",
    [(c, p) for c in sorted(BAD_INPUT_CASES) for p in ("missing", "label", "spacing")]
    + [("cosmos22", "ignore_label")],
)
def test_every_challenge_refuses_bad_input_in_one_line_writing_nothing(tmp_path, capsys, challenge, problem):
    """Issue 15 'Bad input' for each challenge evaluate knows: a missing prediction, a label value outside the
    challenge's definition (COSMOS22's ignore label included: only references may hold it), a spacing mismatch
    -> one line naming the case and the fix, exit 1, nothing written."""
    good, bad, value, undefined = BAD_INPUT_CASES[challenge]
    if problem == "ignore_label":
        undefined = 4
    ok = box((10, 24, 24), (2, 6, 6), (8, 18, 18), value)
    for case in (good, bad):
        write(tmp_path / "gt" / f"{case}.nii.gz", ok)
        write(tmp_path / "pred" / f"{case}.nii.gz", ok)
    expected = {
        "missing": f"1 reference cases have no prediction in {tmp_path / 'pred'}: ['{bad}']; predict them",
        "label": f"{bad}: the prediction holds label values [{undefined}] that",
        "ignore_label": f"{bad}: the prediction holds label values [4] that",
        "spacing": f"{bad}: prediction spacing (2.0, 1.0, 1.0) (z, y, x) differs from the reference's (1.0, 1.0, 1.0)",
    }[problem]
    if problem == "missing":
        (tmp_path / "pred" / f"{bad}.nii.gz").unlink()
    elif problem == "spacing":
        write(tmp_path / "pred" / f"{bad}.nii.gz", ok, (1.0, 1.0, 2.0))
    else:
        write(tmp_path / "pred" / f"{bad}.nii.gz", box(ok.shape, (0, 0, 0), (1, 1, 1), undefined, ok.copy()))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--challenge", challenge, "--quiet"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "predict" in err or "--challenge" in err  # the fix is named
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no metrics file, no output folder
    # the same folders without the problem are scored
    if problem != "missing":
        write(tmp_path / "pred" / f"{bad}.nii.gz", ok)
        assert main(argv) == 0
        assert (tmp_path / "pred" / f"{challenge}_metrics.json").is_file()
