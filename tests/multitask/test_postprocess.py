"""`nnunet-ext postprocess`: rules only where they were meant to run, and a report of what each removed
(issue 17, item 5), plus the one-line refusals of its and `predict`'s arguments (item 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support.refusals import run_refused

from nnunet_ext.cli import main
from nnunet_ext.tools.phantoms import PARTIAL_LABELS, PARTIAL_TASKS


def _prediction(folder: Path, dataset_json: dict) -> np.ndarray:
    """One predicted case: liver (1) with a tumour (2) and a stray second liver blob, a kidney pair (3), a
    spleen (5) and a stray tumour outside the liver."""
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[1:7, 1:7, 1:7] = 1
    seg[3:6, 3:6, 3:6] = 2  # 27 voxels, inside the liver
    seg[13:15, 13:15, 13:15] = 1  # second liver component (8 voxels)
    seg[13:15, 1:3, 13:15] = 2  # tumour touching no liver (8 voxels)
    seg[9:12, 9:12, 1:4] = 3  # kidney, left
    seg[9:12, 1:4, 9:12] = 3  # kidney, right
    seg[1:5, 10:15, 10:15] = 5  # spleen (100 voxels)
    folder.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / "liver_1.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return seg


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_without_a_task_registry_the_default_rules_are_refused(tmp_path, capsys):
    # the same labels as the multi-task phantom, but a dataset.json without its registry: the default rules
    # would treat liver, kidney and spleen as one organ and delete the spleen and one kidney
    _prediction(tmp_path / "pred", {"labels": PARTIAL_LABELS, "file_ending": ".nii.gz"})
    argv = ["postprocess", "-i", str(tmp_path / "pred"), "-o", str(tmp_path / "pp")]
    run_refused(
        argv, capsys, tmp_path, "has no task registry (nnunet_ext_tasks), from which the default rules"
    )
    assert not (tmp_path / "pp").exists()

    # explicit rules run without it, and only those
    assert main([*argv, "--min-size", "2:10"]) == 0
    out = capsys.readouterr().out
    assert "has no task registry; only the rules given by flags are applied" in out
    assert "min_size 2: 8 voxels set to background in 1 case(s)" in out
    seg = _read(tmp_path / "pred" / "liver_1.nii.gz")
    pp = _read(tmp_path / "pp" / "liver_1.nii.gz")
    assert ((seg != pp) == ((seg == 2) & (np.arange(16)[:, None, None] >= 13))).all()
    record = json.loads((tmp_path / "pp" / "postprocessing.json").read_text())
    assert record["min_size"] == {"2": 10} and record["keep_largest"] == {} and record["inside"] == {}
    assert record["removed_voxels"] == {"total": {"min_size 2": 8}, "cases": {"liver_1": {"min_size 2": 8}}}


def test_registry_rules_report_what_each_removed(tmp_path, capsys):
    dj = {"labels": PARTIAL_LABELS, "nnunet_ext_tasks": PARTIAL_TASKS, "file_ending": ".nii.gz"}
    seg = _prediction(tmp_path / "pred", dj)
    assert main(["postprocess", "-i", str(tmp_path / "pred"), "-o", str(tmp_path / "pp")]) == 0
    out = capsys.readouterr().out
    pp = _read(tmp_path / "pp" / "liver_1.nii.gz")
    # the stray liver blob and the tumour outside the liver go (both are components of liver + its tumour, so the
    # largest-component rule of the liver takes them); both kidneys (keep 2) and the spleen stay
    expected = seg.copy()
    expected[13:15, 13:15, 13:15] = 0
    expected[13:15, 1:3, 13:15] = 0
    np.testing.assert_array_equal(pp, expected)
    removed = json.loads((tmp_path / "pp" / "postprocessing.json").read_text())["removed_voxels"]
    assert removed == {"total": {"keep_largest 1": 16}, "cases": {"liver_1": {"keep_largest 1": 16}}}
    assert "keep_largest 1: 16 voxels set to background in 1 case(s)" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep-largest", "abc"], "--keep-largest expects two whole numbers LABEL:COUNT, got 'abc:1'"),
        (["--keep-largest", "1:0"], "--keep-largest 1:0: the count must be at least 1, got 0"),
        (["--min-size", "9:10"], "--min-size 9:10: label 9 is not a foreground label of the dataset.json"),
        (["--inside", "2:2"], "--inside 2:2: a label cannot lie inside itself"),
        (["--inside", "2:7"], "--inside 2:7: label 7 is not a foreground label"),
        (["--no-defaults"], "no rule to apply"),
    ],
)
def test_bad_rules_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    dj = {"labels": PARTIAL_LABELS, "nnunet_ext_tasks": PARTIAL_TASKS, "file_ending": ".nii.gz"}
    _prediction(tmp_path / "pred", dj)
    argv = ["postprocess", "-i", str(tmp_path / "pred"), "-o", str(tmp_path / "pp"), *extra]
    run_refused(argv, capsys, tmp_path, message)


def test_a_broken_dataset_json_is_one_line(tmp_path, capsys):
    _prediction(tmp_path / "pred", {"labels": PARTIAL_LABELS})
    broken = tmp_path / "model.json"
    broken.write_text('{"labels": {"background": 0')
    argv = [
        "postprocess",
        "-i",
        str(tmp_path / "pred"),
        "-o",
        str(tmp_path / "pp"),
        "--dataset-json",
        str(broken),
    ]
    run_refused(argv, capsys, tmp_path, f"the dataset.json {broken} is not valid JSON")
    argv = ["postprocess", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "pp"), "--min-size", "1:2"]
    run_refused(argv, capsys, tmp_path, "the prediction folder")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "gpu0"], "argument -device/--device: 'gpu0' is not a device"),
        (["-f", "abc"], "argument -f/--folds: 'abc' is not a fold; folds are whole numbers or 'all'"),
        (["--step-size", "0"], "--step-size 0.0: the tile step is a fraction of the patch in (0, 1]"),
    ],
)
def test_predict_arguments_are_one_line(tmp_path, capsys, extra, message):
    argv = [
        "predict",
        "-i",
        str(tmp_path),
        "-o",
        str(tmp_path / "out"),
        "--model-folder",
        str(tmp_path),
        *extra,
    ]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_predict_boundaries_folds_are_checked(tmp_path, capsys):
    argv = [
        "predict-boundaries",
        "-m",
        str(tmp_path),
        "-i",
        str(tmp_path),
        "-o",
        str(tmp_path / "out"),
        "-f",
        "x",
    ]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert (
        stop.value.code == 1
        and "argument -f/--folds: 'x' is not a fold" in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()
