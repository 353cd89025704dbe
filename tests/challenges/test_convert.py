"""`nnunet-ext convert`: each challenge's converter on a small fake source folder in the official layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from support.challenge_fakes import (  # noqa: F401
    COSMOS_SHAPE,
    SHAPE,
    _mk,
    ct,
    fake_amos,
    fake_cosmos,
    fake_kipa,
    fake_kits21,
    fake_mots,
    organ_label,
    outline,
    qvj,
    qvs,
    read,
    tree_hash,
    write,
    write_dicom_series,
)

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import convert
from nnunet_ext.cli import main
from nnunet_ext.core.errors import UserError

# ------------------------------------------------------------------------------------------ fake sources


# --------------------------------------------------------------------------------------------- KiPA22
def test_kipa22_converts_checks_and_never_touches_the_source(tmp_path, capsys):
    src = fake_kipa(tmp_path)
    before = tree_hash(src)
    raw = tmp_path / "raw"
    rc = main(["convert", "kipa22", str(src), "--id", "11", "--out", str(raw), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "converted 3 training and 1 test cases" in out and "nnUNetv2_plan_and_preprocess -d 11" in out
    folder = raw / "Dataset011_KiPA22"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "vein": 1, "kidney": 2, "artery": 3, "tumour": 4}
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"KiPA_{i}.nii.gz" for i in (1, 2, 3)]
    assert (folder / "imagesTs" / "KiPA_71_0000.nii.gz").is_file()
    np.testing.assert_array_equal(read(folder / "labelsTr" / "KiPA_2.nii.gz"), organ_label())
    image = sitk.ReadImage(str(folder / "imagesTr" / "KiPA_2_0000.nii.gz"))
    assert np.allclose(image.GetSpacing(), (0.7, 0.7, 1.0))
    assert dj["nnunet_ext_challenge"]["cases"]["KiPA_71"] == {"split": "Ts", "original": "71"}
    assert tree_hash(src) == before
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]

    # an existing dataset is refused without --force
    with pytest.raises(UserError, match="already exists"):
        convert(get_challenge("kipa22"), src, 11, out=raw, progress=False)
    convert(get_challenge("kipa22"), src, 11, out=raw, progress=False, force=True)
    linked = convert(get_challenge("kipa22"), src, 14, out=raw, progress=False, link=True)
    image_file = linked.folder / "imagesTr" / "KiPA_1_0000.nii.gz"
    assert image_file.stat().st_ino == (src / "train" / "image" / "1.nii.gz").stat().st_ino

    # nnU-Net's own integrity check accepts the result
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)


def test_kipa22_lists_every_bad_case_and_skip_bad_leaves_them_out(tmp_path):
    src = fake_kipa(tmp_path)
    write(src / "train" / "label" / "2.nii.gz", organ_label((1, 2, 3, 7)))  # 7: not a KiPA label
    write(src / "train" / "label" / "3.nii.gz", organ_label(), spacing=(0.7, 0.7, 2.0))  # geometry mismatch
    write(src / "train" / "image" / "4.nii.gz", ct(4))  # no label
    raw = tmp_path / "raw"
    with pytest.raises(UserError) as err:
        convert(get_challenge("kipa22"), src, 12, out=raw, progress=False)
    text = str(err.value)
    assert "2 of 4 cases" in text and "[7]" in text and "spacing" in text and "--skip-bad" in text
    assert not raw.exists() or not list(raw.iterdir())  # nothing written
    result = convert(get_challenge("kipa22"), src, 12, out=raw, progress=False, skip_bad=True)
    assert result.converted == {"Tr": ["KiPA_1"], "Ts": ["KiPA_71"]}
    reasons = dict(result.skipped)
    assert "no label" in reasons["train/image/4.nii.gz"]
    assert "label values [7]" in reasons["KiPA_2"] and "spacing" in reasons["KiPA_3"]
    skipped = json.loads((result.folder / "dataset.json").read_text())["nnunet_ext_challenge"]["skipped"]
    assert {s["case"] for s in skipped} == {"train/image/4.nii.gz", "KiPA_2", "KiPA_3"}
    assert sorted(p.name for p in (result.folder / "labelsTr").iterdir()) == ["KiPA_1.nii.gz"]


def test_convert_errors_name_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train/image"):
        convert(get_challenge("kipa22"), tmp_path / "empty", 13, out=tmp_path / "raw", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        convert(get_challenge("kits21"), tmp_path / "nope", 13, out=tmp_path / "raw", progress=False)
    with pytest.raises(UserError, match="unknown challenge"):
        get_challenge("brats")
    assert (
        main(["convert", "kits21", str(tmp_path / "empty"), "--id", "5", "--regions", "--test-list", "x"])
        == 1
    )


# --------------------------------------------------------------------------------------------- AMOS22
def test_amos22_task1_keeps_ct_task2_keeps_all(tmp_path):
    src = fake_amos(tmp_path)
    raw = tmp_path / "raw"
    r1 = convert(get_challenge("amos22-task1"), src, 218, out=raw, progress=False)
    assert r1.converted == {"Tr": ["amos_0001", "amos_0002", "amos_0005"], "Ts": ["amos_0010"]}
    assert {what for what, why in r1.skipped if "MRI case (AMOS22 task 1 (CT): CT only)" in why} == {
        "imagesTr/amos_0507.nii.gz",
        "imagesTs/amos_0540.nii.gz",
    }
    dj = json.loads((r1.folder / "dataset.json").read_text())
    assert dj["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    assert dj["labels"]["prostate/uterus"] == 15 and len(dj["labels"]) == 16
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3
    assert (r1.folder / "labelsTr" / "amos_0005.nii.gz").is_file()  # validation -> training, as nnU-Net

    r2 = convert(get_challenge("amos22-task2"), src, 219, out=raw, progress=False)
    assert r2.converted["Tr"] == ["amos_0001", "amos_0002", "amos_0507", "amos_0005"]
    assert r2.converted["Ts"] == ["amos_0010", "amos_0540"]
    dj2 = json.loads((r2.folder / "dataset.json").read_text())
    assert dj2["channel_names"] == {"0": "either_CT_or_MR"}
    assert dj2["nnunet_ext_challenge"]["cases"]["amos_0507"]["modality"] == "MRI"
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(r2.folder), num_processes=1)  # nnU-Net reads it with NibabelIOWithReorient

    r3 = convert(get_challenge("amos22-mri"), src, 221, out=raw, progress=False)
    assert r3.converted == {"Tr": ["amos_0507"], "Ts": ["amos_0540"]}

    (src / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    with pytest.raises(UserError, match="AMOS22 has 0..15"):
        convert(get_challenge("amos22-task1"), src, 220, out=raw, progress=False)


# --------------------------------------------------------------------------------------------- KiTS21
def test_kits21_cases_test_split_and_regions(tmp_path):
    src = fake_kits21(tmp_path)
    raw = tmp_path / "raw"
    r = convert(get_challenge("kits21"), src, 135, out=raw, progress=False)
    assert r.converted == {"Tr": ["case_00000", "case_00001", "case_00002"], "Ts": ["case_00300"]}
    dj = json.loads((r.folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "kidney": 1, "tumour": 2, "cyst": 3}
    np.testing.assert_array_equal(read(r.folder / "labelsTr" / "case_00001.nii.gz"), organ_label((1, 2, 3)))

    rr = convert(get_challenge("kits21"), src, 136, out=raw, progress=False, regions=True)
    dj = json.loads((rr.folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert dj["regions_class_order"] == [1, 3, 2]

    write(src / "case_00001" / "aggregated_MAJ_seg.nii.gz", organ_label((1, 2, 3)), spacing=(1, 1, 1))
    with pytest.raises(UserError, match="case_00001: geometry"):
        convert(get_challenge("kits21"), src, 137, out=raw, progress=False)


# --------------------------------------------------------------------------------------------- COSMOS22


# --------------------------------------------------------------------------------------------- MOTS


def test_mots_seven_sources_then_tasks_merge(tmp_path, capsys):
    from nnunet_ext.multitask.tasks import load_task_registry_from_folder

    src = fake_mots(tmp_path)
    before = tree_hash(src)
    (tmp_path / "MOTS_test.txt").write_text(
        "0Liver/volume-1.nii 0Liver/segmentation-1.nii\n1Kidney/origin/case_00001/imaging.nii.gz x\n"
        "3Pancreas/imagesTr/pancreas_002.nii.gz 3Pancreas/labelsTr/pancreas_002.nii.gz\n"
    )
    raw = tmp_path / "raw"
    argv = ["convert", "mots", str(src), "--id", "701", "--out", str(raw), "--quiet"]
    assert main([*argv, "--test-list", str(tmp_path / "MOTS_test.txt")]) == 0
    out = capsys.readouterr().out
    assert "nnunet-ext tasks merge --id M --preset mots --source liver=701 --source kidney=702" in out
    names = sorted(p.name for p in raw.iterdir())
    assert names == [
        "Dataset701_MOTSLiver", "Dataset702_MOTSKidney", "Dataset703_MOTSHepaticvessel", "Dataset704_MOTSPancreas",
        "Dataset705_MOTSColon", "Dataset706_MOTSLung", "Dataset707_MOTSSpleen",
    ]  # fmt: skip
    liver = raw / "Dataset701_MOTSLiver"
    assert sorted(p.name for p in (liver / "labelsTr").iterdir()) == ["liver_0.nii.gz"]
    assert (liver / "labelsTs" / "liver_1.nii.gz").is_file()  # listed in the test list
    np.testing.assert_array_equal(read(liver / "labelsTr" / "liver_0.nii.gz"), organ_label((1, 2), (4, 6, 6)))
    assert (raw / "Dataset702_MOTSKidney" / "imagesTs" / "case_00001_0000.nii.gz").is_file()
    assert (raw / "Dataset704_MOTSPancreas" / "labelsTs" / "pancreas_002.nii.gz").is_file()
    assert (raw / "Dataset705_MOTSColon" / "imagesTs" / "colon_009_0000.nii.gz").is_file()
    assert json.loads((raw / "Dataset705_MOTSColon" / "dataset.json").read_text())["labels"] == {
        "background": 0,
        "colon_tumour": 1,
    }
    assert tree_hash(src) == before

    # the converted datasets are accepted by `nnunet-ext tasks merge --preset mots`
    merge = ["tasks", "merge", "--id", "700", "--preset", "mots", "--out", str(raw)]
    for k, task in enumerate(("liver", "kidney", "hepaticvessel", "pancreas", "colon", "lung", "spleen")):
        merge += ["--source", f"{task}={raw / names[k]}"]
    assert main(merge) == 0
    merged = next(raw.glob("Dataset700_*"))
    reg = load_task_registry_from_folder(merged)
    assert reg.tasks == ("liver", "kidney", "hepaticvessel", "pancreas", "colon", "lung", "spleen")
    assert (merged / "labelsTs" / "liver_liver_1.nii.gz").is_file()

    # --merge-id does both in one command
    assert (
        main(["convert", "mots", str(src), "--id", "711", "--out", str(raw), "--quiet", "--merge-id", "710"])
        == 0
    )
    assert load_task_registry_from_folder(next(raw.glob("Dataset710_*"))).tasks == reg.tasks


def test_mots_reports_missing_sources(tmp_path):
    src = fake_mots(tmp_path)
    import shutil

    shutil.rmtree(src / "5Lung")
    from nnunet_ext.challenges.convert import convert_mots

    with pytest.raises(UserError, match=r"no folder for lung \(5Lung or Task06_Lung\)"):
        convert_mots(src, 720, out=tmp_path / "raw", progress=False)
    # a label value the source does not define (MSD spleen: 0/1 only)
    write(src / "6Spleen" / "labelsTr" / "spleen_002.nii.gz", organ_label((1, 2), (4, 6, 6)))
    with pytest.raises(UserError, match=r"spleen_002.nii.gz: label values \[2\]"):
        convert(get_challenge("mots-spleen"), src / "6Spleen", 730, out=tmp_path / "raw", progress=False)
