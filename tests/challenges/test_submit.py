"""`nnunet-ext submit`: file names, format and label values per challenge; every test case must be present."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from support.challenge_fakes import (
    COSMOS_SHAPE,
    fake_cosmos,
    fake_kipa,
    fake_kits21,
    fake_mots,
    organ_label,
    read,
)

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import convert
from nnunet_ext.challenges.submit import submit
from nnunet_ext.cli import main
from nnunet_ext.core.errors import UserError


def predict_like(image_path, out_path, array):
    """A fake nnU-Net prediction: ``array`` in the geometry of the converted test image."""
    image = sitk.ReadImage(str(image_path))
    pred = sitk.GetImageFromArray(array.astype(np.uint8))
    pred.CopyInformation(image)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(pred, str(out_path))


def test_kipa22_names_values_and_completeness(tmp_path, capsys):
    raw = tmp_path / "raw"
    result = convert(get_challenge("kipa22"), fake_kipa(tmp_path), 11, out=raw, progress=False)
    pred = tmp_path / "pred"
    out = tmp_path / "submission"
    argv = ["submit", "kipa22", str(pred), str(out), "-d", str(result.folder)]
    pred.mkdir()
    assert main(argv) == 1  # the test case KiPA_71 has no prediction
    err = capsys.readouterr().err
    assert "1 of 1 test cases have no prediction" in err and "KiPA_71" in err and not out.exists()

    predict_like(result.folder / "imagesTs" / "KiPA_71_0000.nii.gz", pred / "KiPA_71.nii.gz", organ_label())
    predict_like(result.folder / "imagesTr" / "KiPA_1_0000.nii.gz", pred / "KiPA_1.nii.gz", organ_label())
    assert main(argv) == 0
    assert "wrote 1 files" in capsys.readouterr().out
    # the challenge's name, training case left out; the marker that lets --overwrite replace this folder later
    assert sorted(p.name for p in out.iterdir()) == [".nnunet_ext_submission", "71.nii.gz"]
    written = sitk.ReadImage(str(out / "71.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), organ_label())
    assert written.GetPixelID() == sitk.sitkUInt8 and np.allclose(written.GetSpacing(), (0.7, 0.7, 1.0))

    assert main(argv) == 1 and "pass --overwrite" in capsys.readouterr().err  # existing OUT
    bad = organ_label((1, 2, 9))
    predict_like(result.folder / "imagesTs" / "KiPA_71_0000.nii.gz", pred / "KiPA_71.nii.gz", bad)
    with pytest.raises(UserError, match=r"label values \[9\]"):
        submit("kipa22", pred, out, result.folder, overwrite=True)
    assert (out / "71.nii.gz").is_file()  # the old submission is kept when the new one fails

    with pytest.raises(UserError, match="not kits21"):
        submit("kits21", pred, tmp_path / "other", result.folder)


@pytest.mark.parametrize("problem", ["spacing", "shape"])
def test_a_prediction_off_its_test_images_grid_is_refused(tmp_path, capsys, problem):
    """A prediction whose spacing or shape is not its test image's: one line naming the case and the fix, exit 1,
    nothing written (the submission would keep the wrong geometry)."""
    result = convert(get_challenge("kipa22"), fake_kipa(tmp_path), 12, out=tmp_path / "raw", progress=False)
    image = result.folder / "imagesTs" / "KiPA_71_0000.nii.gz"
    lab = organ_label()
    pred = sitk.GetImageFromArray(lab if problem == "spacing" else lab[:-1])
    pred.SetSpacing((0.7, 0.7, 2.0) if problem == "spacing" else sitk.ReadImage(str(image)).GetSpacing())
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(pred, str(tmp_path / "pred" / "KiPA_71.nii.gz"))
    out = tmp_path / "submission"
    assert main(["submit", "kipa22", str(tmp_path / "pred"), str(out), "-d", str(result.folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "KiPA_71: prediction" in err and "its test image KiPA_71_0000.nii.gz" in err
    assert "predict the converted dataset's imagesTs with nnUNetv2_predict" in err
    assert not out.exists() and not list(tmp_path.glob(".submission*"))


def test_kits21_prediction_file_names(tmp_path):
    result = convert(
        get_challenge("kits21"), fake_kits21(tmp_path), 135, out=tmp_path / "raw", progress=False
    )
    pred = tmp_path / "pred"
    lab = organ_label((1, 2, 3))
    predict_like(result.folder / "imagesTs" / "case_00300_0000.nii.gz", pred / "case_00300.nii.gz", lab)
    out, written = submit("kits21", pred, tmp_path / "sub", result.folder)
    # kits21/evaluation/evaluate_predictions.py: predictions MUST be named case_XXXXX.nii.gz
    assert written == ["case_00300.nii.gz"]
    np.testing.assert_array_equal(read(out / "case_00300.nii.gz"), lab)


def test_cosmos22_puts_the_halves_back_together(tmp_path):
    src = fake_cosmos(tmp_path)
    result = convert(get_challenge("cosmos22"), src, 40, out=tmp_path / "raw", progress=False)
    pred = tmp_path / "pred"
    z, y, x = COSMOS_SHAPE
    left = np.zeros((z, y, x // 2), np.uint8)
    left[:, 4:8, 6:10] = 1
    right = np.zeros((z, y, x // 2), np.uint8)
    right[:, 2:6, 3:5] = 3
    predict_like(result.folder / "imagesTs" / "t01_L_0000.nii.gz", pred / "t01_L.nii.gz", left)
    predict_like(result.folder / "imagesTs" / "t01_R_0000.nii.gz", pred / "t01_R.nii.gz", right)
    out, written = submit("cosmos22", pred, tmp_path / "sub", result.folder)
    assert written == ["t01.nii.gz"]
    full = sitk.ReadImage(str(out / "t01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(full), np.concatenate([right, left], axis=2))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(src / "t01")))
    original = reader.Execute()
    assert full.GetSize() == original.GetSize()
    assert np.allclose(full.GetSpacing(), original.GetSpacing()) and np.allclose(
        full.GetOrigin(), original.GetOrigin()
    )


def test_mots_merged_predictions_back_to_each_source(tmp_path):
    from nnunet_ext.challenges.convert import convert_mots

    raw = tmp_path / "raw"
    convert_mots(fake_mots(tmp_path), 701, merge_id=700, out=raw, progress=False)
    merged = next(raw.glob("Dataset700_*"))
    labels = get_challenge("mots").labels
    test_ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (merged / "imagesTs").iterdir())
    assert "spleen_spleen_009" in test_ids and "liver_liver_0" not in test_ids
    pred = tmp_path / "pred"
    for cid in test_ids:
        arr = np.zeros((4, 6, 6), np.uint8)
        arr[1, 1, 1] = labels["spleen"]
        arr[2, 2, 2] = labels["pancreas_tumour"]
        predict_like(merged / "imagesTs" / f"{cid}_0000.nii.gz", pred / f"{cid}.nii.gz", arr)
    out, written = submit("mots", pred, tmp_path / "sub", merged)
    assert "spleen/spleen_009.nii.gz" in written and "pancreas/pancreas_009.nii.gz" in written
    spleen = read(out / "spleen" / "spleen_009.nii.gz")
    assert spleen[1, 1, 1] == 1 and spleen.sum() == 1  # the spleen task's label 1; other tasks dropped
    pancreas = read(out / "pancreas" / "pancreas_009.nii.gz")
    assert pancreas[2, 2, 2] == 2 and pancreas.sum() == 2  # MSD pancreas: 2 = tumour
    with pytest.raises(UserError, match="not a merged dataset"):
        submit("mots", pred, tmp_path / "sub2", next(raw.glob("Dataset701_*")))


def test_amos22_sheared_files_keep_their_affine(tmp_path):
    import nibabel
    from support.challenge_fakes import fake_amos
    from support.sheared import write_sheared

    src = fake_amos(tmp_path)
    lab = np.zeros((8, 8, 6), np.uint8)
    lab[2:4, 2:4, 1:3] = 6
    write_sheared(src / "imagesTr" / "amos_0003.nii.gz", np.zeros((8, 8, 6)))
    write_sheared(src / "labelsTr" / "amos_0003.nii.gz", lab)  # checked through nibabel's affines
    write_sheared(src / "imagesTs" / "amos_0010.nii.gz", np.zeros((8, 8, 6)))  # the prediction's geometry
    result = convert(get_challenge("amos22-task1"), src, 218, out=tmp_path / "raw", progress=False)
    assert "amos_0003" in result.converted["Tr"]
    write_sheared(tmp_path / "pred" / "amos_0010.nii.gz", lab)
    out, written = submit("amos22-task1", tmp_path / "pred", tmp_path / "sub", result.folder)
    assert written == ["amos_0010.nii.gz"]
    image = nibabel.load(str(out / "amos_0010.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), lab)
    assert np.allclose(image.affine, nibabel.load(str(tmp_path / "pred" / "amos_0010.nii.gz")).affine)


def kipa_like(seed: int, shape=(24, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A CTA-like volume: 4 blobs (vein, kidney, artery, tumour) with distinct intensities, random positions."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for value, radius in ((2, 9), (1, 4), (3, 4), (4, 5)):
        c = [rng.integers(r, s - r) for r, s in zip((radius // 2 + 2, radius + 2, radius + 2), shape)]
        lab[((zz - c[0]) * 2) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < radius**2] = value
    image = np.array([0, 200, 160, 300, 90], np.float32)[lab] + rng.normal(0, 10, shape).astype(np.float32)
    return image, lab


@pytest.mark.slow
def test_kipa22_download_to_submission_with_the_stock_commands(tmp_path):
    """convert -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train (smoke schedule) -> predict -> submit, evaluate.

    The plain trainer keeps this test short; every trainer of ours runs the same stock commands in
    tests/test_e2e_cli.py (BA-Net, the KiPA recipe's, included)."""
    from support.challenge_fakes import write
    from support.commands import BIN, nnunet_env, training_env

    def run(cmd, env):  # as conftest.run, but decoding nnU-Net's progress bars as UTF-8 whatever the locale
        import subprocess

        proc = subprocess.run(
            [str(BIN / cmd[0]), *cmd[1:]],
            env=env,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    src = tmp_path / "KiPA22"
    for i in range(1, 6):
        image, lab = kipa_like(i)
        write(src / "train" / "image" / f"{i}.nii.gz", image, spacing=(0.8, 0.8, 1.0))
        write(src / "train" / "label" / f"{i}.nii.gz", lab, spacing=(0.8, 0.8, 1.0))
    for i in (71,):
        image, lab = kipa_like(i)
        write(src / "open" / "image" / f"{i}.nii.gz", image, spacing=(0.8, 0.8, 1.0))
        write(src / "open" / "label" / f"{i}.nii.gz", lab, spacing=(0.8, 0.8, 1.0))
    env = nnunet_env(tmp_path)
    for sub in ("raw", "preprocessed", "results"):
        (tmp_path / sub).mkdir()
    run(["nnunet-ext", "convert", "kipa22", str(src), "--id", "220", "--quiet"], env)
    dataset = tmp_path / "raw" / "Dataset220_KiPA22"
    run(["nnUNetv2_plan_and_preprocess", "-d", "220", "-c", "3d_fullres", "-np", "1"], env)
    run(["nnunet-ext", "plans", "tiny", "220"], env)
    trainer = "nnUNetTrainer_smoke"
    run(["nnUNetv2_train", "220", "3d_tiny", "0", "-tr", trainer, "-device", "cpu"], training_env(env))
    pred = tmp_path / "pred"
    predict = [
        "nnUNetv2_predict",
        "-i",
        str(dataset / "imagesTs"),
        "-o",
        str(pred),
        "-d",
        "220",
        "-c",
        "3d_tiny",
    ]
    run([*predict, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    proc = run(["nnunet-ext", "submit", "kipa22", str(pred), str(tmp_path / "submission"), "-d", "220"], env)
    assert "wrote 1 files" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "submission").glob("*.nii.gz")) == ["71.nii.gz"]
    run(
        ["nnunet-ext", "evaluate", str(pred), str(dataset / "labelsTs"), "--challenge", "kipa22", "--quiet"],
        env,
    )
    import json

    res = json.loads((pred / "kipa22_metrics.json").read_text())
    assert set(res["mean"]) == {"vein", "kidney", "artery", "tumour"} and list(res["cases"]) == ["KiPA_71"]
    assert all(0.0 <= v["Dice"] <= 1.0 for v in res["mean"].values())


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_overwrite_never_replaces_what_submit_did_not_write(tmp_path, capsys, monkeypatch):
    """`submit --overwrite` refuses an OUT that is, holds or lies inside the predictions, the dataset or
    nnU-Net's folders, and an existing folder without our marker; nothing changes on disk."""
    raw = tmp_path / "raw"
    result = convert(get_challenge("kipa22"), fake_kipa(tmp_path), 80, out=raw, progress=False)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    results = tmp_path / "results"
    pred = results / "pred"
    predict_like(result.folder / "imagesTs" / "KiPA_71_0000.nii.gz", pred / "KiPA_71.nii.gz", organ_label())
    (results / "notes.txt").write_text("unrelated work")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("not a submission")
    before = _tree(tmp_path)
    for out, message in (
        (results, "is or contains the prediction folder"),
        (pred, "is or contains the prediction folder"),
        (pred / "sub", "lies inside the prediction folder"),
        (result.folder, "is or contains the converted dataset"),
        (raw, "is or contains the converted dataset"),
        (raw / "Dataset081_Other" / "sub", "lies inside an nnU-Net dataset folder of $nnUNet_raw"),
        (mine, "is not a submission written by `nnunet-ext submit`"),
    ):
        argv = ["submit", "kipa22", str(pred), str(out), "-d", "80", "--overwrite"]
        assert main(argv) == 1, out
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (out, err)
    assert _tree(tmp_path) == before
    # a folder submit wrote, and an empty one, are replaced with --overwrite
    sub = tmp_path / "sub"
    assert main(["submit", "kipa22", str(pred), str(sub), "-d", "80"]) == 0
    assert main(["submit", "kipa22", str(pred), str(sub), "-d", "80", "--overwrite"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["submit", "kipa22", str(pred), str(empty), "-d", "80", "--overwrite"]) == 0
    assert (empty / "71.nii.gz").is_file()
