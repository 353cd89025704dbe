"""MOTS: DoDNet's test split (shipped) and its post-processing as the ``mots`` preset of `nnunet-ext postprocess`."""

from __future__ import annotations

import json

from support.challenge_fakes import fake_mots, tree_hash

from nnunet_ext.challenges.mots import dodnet_test_split
from nnunet_ext.cli import main


def test_shipped_split_is_dodnets_235_cases():
    split = dodnet_test_split()
    assert {t: len(c) for t, c in split.items()} == {
        "liver": 27, "kidney": 42, "hepaticvessel": 61, "pancreas": 57, "colon": 26, "lung": 13, "spleen": 9,
    }  # fmt: skip
    assert "liver_0" in split["liver"] and "case_00000" in split["kidney"] and "spleen_9" in split["spleen"]
    assert "hepaticvessel_001" in split["hepaticvessel"] and "colon_001" in split["colon"]


def test_convert_uses_dodnets_split_by_default_and_reports_only_the_sources_own_cases(tmp_path, capsys):
    src = fake_mots(
        tmp_path
    )  # colon_001, colon_002 labelled (colon_001 is in DoDNet's list), colon_009 imagesTs
    before = tree_hash(src)
    raw = tmp_path / "raw"
    assert (
        main(["convert", "mots-colon", str(src / "4Colon"), "--id", "705", "--out", str(raw), "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    colon = raw / "Dataset705_MOTSColon"
    assert sorted(p.name for p in (colon / "labelsTs").iterdir()) == ["colon_001.nii.gz"]
    assert sorted(p.name for p in (colon / "labelsTr").iterdir()) == ["colon_002.nii.gz"]
    # the 24 listed colon cases this copy lacks (colon_009 is here, unlabelled): one line, no other task
    assert "24 colon test case(s): in DoDNet's test list but not in this source: colon_024, colon_029" in out
    assert "liver" not in out and "case_000" not in out and "not found" not in out
    skipped = json.loads((colon / "dataset.json").read_text())["nnunet_ext_challenge"]["skipped"]
    assert len(skipped) == 1
    # no split on request
    argv = ["convert", "mots-colon", str(src / "4Colon"), "--id", "706", "--out", str(raw), "--quiet"]
    assert main([*argv, "--test-list", "none"]) == 0
    assert len(list((raw / "Dataset706_MOTSColon" / "labelsTr").iterdir())) == 2
    assert tree_hash(src) == before


def test_a_users_list_in_either_of_dodnets_formats(tmp_path, capsys):
    src = fake_mots(tmp_path)
    raw = tmp_path / "raw"
    paths = tmp_path / "paths.txt"  # dataset/list/MOTS/MOTS_test.txt format
    paths.write_text(
        "0123456_spacing_same/0Liver/imagesTr/liver_1.nii.gz 0123456_spacing_same/0Liver/labelsTr/liver_1.nii.gz\n"
        "0123456_spacing_same/1Kidney/origin/case_00001/imaging.nii.gz x/segmentation.nii.gz\n"
        "0123456_spacing_same/1Kidney/origin/case_00007/imaging.nii.gz x/segmentation.nii.gz\n"
    )
    argv = ["convert", "mots-kidney", str(src / "1Kidney"), "--out", str(raw), "--quiet"]
    assert main([*argv, "--id", "702", "--test-list", str(paths)]) == 0
    out = capsys.readouterr().out
    assert (raw / "Dataset702_MOTSKidney" / "labelsTs" / "case_00001.nii.gz").is_file()
    assert "1 kidney test case(s)" in out and "case_00007" in out and "liver_1" not in out
    ids = tmp_path / "ids.txt"  # data_list/MOTS/MOTS_test.txt format: task-prefixed ids
    ids.write_text("liver_0\nkidney_00000\nspleen_9\n")
    assert main([*argv, "--id", "703", "--test-list", str(ids)]) == 0
    assert (raw / "Dataset703_MOTSKidney" / "labelsTs" / "case_00000.nii.gz").is_file()
    bad = tmp_path / "bad.txt"
    bad.write_text("liver_0\nbrain_7\n")
    assert main([*argv, "--id", "704", "--test-list", str(bad)]) == 1
    assert "bad.txt line 2: cannot tell the MOTS task of 'brain_7'" in capsys.readouterr().err
    assert not list(raw.glob("Dataset704_*"))
    assert main([*argv, "--id", "704", "--test-list", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt does not exist; pass 'dodnet'" in capsys.readouterr().err


def _write(path, array, spacing_zyx):
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))


def test_postprocess_preset_mots_on_merged_and_single_source_predictions(tmp_path, capsys):
    import numpy as np
    from support.challenge_fakes import read
    from support.mots_cases import build_pp_case

    from nnunet_ext.challenges import get_challenge
    from nnunet_ext.challenges.mots import DODNET_SPACING, dodnet_postprocess

    unified = get_challenge("mots").labels
    # a merged-dataset prediction: a liver case and a colon case (universal maps; the rules of every task apply)
    _, liver = build_pp_case("liver")
    _, colon = build_pp_case("colon")
    lut_liver = np.array([0, unified["liver"], unified["liver_tumour"]], np.uint8)
    merged = lut_liver[liver]
    merged[colon == 1] = unified["colon_tumour"]
    pred = tmp_path / "pred"
    _write(pred / "liver_liver_1.nii.gz", merged, DODNET_SPACING)
    labels = {k: v for k, v in unified.items()}
    (pred / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    before = tree_hash(pred)
    assert main(["postprocess", "-i", str(pred), "-o", str(tmp_path / "pp"), "--preset", "mots"]) == 0
    out = read(tmp_path / "pp" / "liver_liver_1.nii.gz")
    expected = dodnet_postprocess(merged, "liver", unified["liver"], unified["liver_tumour"], 0.96)
    expected = dodnet_postprocess(expected, "colon", None, unified["colon_tumour"], 0.96)
    np.testing.assert_array_equal(out, expected)
    assert (out == unified["colon_tumour"]).sum() < (merged == unified["colon_tumour"]).sum()  # largest kept
    rules = json.loads((tmp_path / "pp" / "postprocessing.json").read_text())
    assert rules["preset"] == "mots" and rules["tasks"]["liver"] == {"organ": 1, "tumour": 2}
    assert tree_hash(pred) == before

    # a single source's prediction (its own labels), at 1 mm: the 50-voxel rule as a volume (48 voxels)
    single = tmp_path / "single"
    _write(single / "colon_001.nii.gz", colon, (1.0, 1.0, 1.0))
    (single / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "colon_tumour": 1}}))
    assert main(["postprocess", "-i", str(single), "-o", str(tmp_path / "pp1"), "--preset", "mots"]) == 0
    np.testing.assert_array_equal(
        read(tmp_path / "pp1" / "colon_001.nii.gz"), dodnet_postprocess(colon, "colon", None, 1)
    )

    # refused: other flags with the preset, a dataset that is not MOTS
    argv = ["postprocess", "-i", str(single), "-o", str(tmp_path / "pp2"), "--preset", "mots"]
    assert main([*argv, "--min-size", "1:10"]) == 1
    assert "--preset mots is DoDNet's rule set" in capsys.readouterr().err
    (single / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "brain": 1}}))
    assert main(argv) == 1
    assert "neither a merged MOTS dataset's" in capsys.readouterr().err
    assert not (tmp_path / "pp2").exists()
