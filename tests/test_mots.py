"""MOTS: DoDNet's test split (shipped) and its post-processing as the ``mots`` preset of `nnunet-ext postprocess`."""

from __future__ import annotations

import json

from nnunet_ext.challenges.mots import dodnet_test_split
from nnunet_ext.cli import main
from tests.test_convert import fake_mots, tree_hash


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
