"""`nnunet-ext tasks merge`: merging raw datasets into one partially labelled dataset with a task registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.cli import main
from nnunet_ext.core.errors import UserError
from nnunet_ext.multitask.merge import MOTS_PRESET, merge_datasets
from nnunet_ext.multitask.tasks import load_task_registry_from_folder


def write_raw(root: Path, dataset_id: int, name: str, labels: dict, channels=None, n=2, seed=0) -> Path:
    """A tiny nnU-Net raw dataset: n cases of 6x8x8 with random labels from ``labels``."""
    channels = channels or {"0": "CT"}
    folder = root / f"Dataset{dataset_id:03d}_{name}"
    rng = np.random.default_rng(seed)
    values = sorted(labels.values())
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for i in range(n):
        lab = rng.choice(values, size=(6, 8, 8)).astype(np.uint8)
        im = sitk.GetImageFromArray(lab)
        im.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(im, str(folder / "labelsTr" / f"case_{i:03d}.nii.gz"))
        for c in range(len(channels)):
            img = sitk.GetImageFromArray(rng.normal(size=(6, 8, 8)).astype(np.float32))
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(folder / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz"))
            sitk.WriteImage(img, str(folder / "imagesTs" / f"test_{i:03d}_{c:04d}.nii.gz"))
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": channels, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"})
    )
    return folder


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def sources(tmp_path):
    raw = tmp_path / "raw"
    liver = write_raw(raw, 11, "Liver", {"background": 0, "liver": 1, "cancer": 2})
    spleen = write_raw(raw, 12, "Spleen", {"background": 0, "spleen": 1, "other": 2}, seed=1)
    return raw, liver, spleen


def test_merge_remaps_prefixes_and_writes_registry(sources, capsys, monkeypatch):
    raw, liver, spleen = sources
    before = {p: tree_hash(p) for p in (liver, spleen)}
    monkeypatch.setenv("nnUNet_raw", str(raw))
    rc = main(
        [
            "tasks", "merge", "--id", "20", "--name", "Merged",
            "--source", "liver=11", "--source", "spleen=Dataset012_Spleen",
            "--map", "liver:liver=liver,cancer=liver_tumour",
            "--map", "spleen:1=spleen,other=null",
        ]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "task liver: 2 training" in out and "background (dropped)" in out
    merged = raw / "Dataset020_Merged"
    dj = json.loads((merged / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "liver_tumour": 2, "spleen": 3}
    assert dj["nnunet_ext_tasks"] == {
        "liver": {"prefixes": ["liver_"], "labels": ["liver", "liver_tumour"]},
        "spleen": {"prefixes": ["spleen_"], "labels": ["spleen"]},
    }
    reg = load_task_registry_from_folder(merged)
    assert reg.tasks == ("liver", "spleen")
    assert sorted(p.name for p in (merged / "labelsTr").iterdir()) == [
        "liver_case_000.nii.gz", "liver_case_001.nii.gz", "spleen_case_000.nii.gz", "spleen_case_001.nii.gz",
    ]  # fmt: skip
    assert (merged / "imagesTs" / "spleen_test_001_0000.nii.gz").is_file()
    src = read(spleen / "labelsTr" / "case_001.nii.gz")
    dst = read(merged / "labelsTr" / "spleen_case_001.nii.gz")
    np.testing.assert_array_equal(dst, np.where(src == 1, 3, 0))
    np.testing.assert_array_equal(
        read(merged / "labelsTr" / "liver_case_000.nii.gz"), read(liver / "labelsTr" / "case_000.nii.gz")
    )
    np.testing.assert_array_equal(
        read(merged / "imagesTr" / "liver_case_000_0000.nii.gz"),
        read(liver / "imagesTr" / "case_000_0000.nii.gz"),
    )
    assert {p: tree_hash(p) for p in (liver, spleen)} == before  # sources untouched
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]  # no temp folder left

    # existing output: refused without --force, replaced with it
    spec = {"tasks": {"liver": {"source": str(liver), "labels": {"1": "liver", "2": "liver_tumour"}}}}
    with pytest.raises(UserError, match="already exists"):
        merge_datasets(spec, raw, 20, "Other")
    target, _ = merge_datasets(spec, raw, 20, "Other", force=True)
    assert target.name == "Dataset020_Other" and not merged.exists()


def test_merge_refuses_conflicting_inputs(sources, tmp_path):
    raw, liver, spleen = sources
    two_channel = write_raw(raw, 13, "MR", {"background": 0, "spleen": 1}, channels={"0": "T1", "1": "T2"})
    ct_named_mr = write_raw(raw, 14, "MRI", {"background": 0, "spleen": 1}, channels={"0": "MRI"})
    liver_map = {"1": "liver", "2": "liver_tumour"}

    def spec(other, labels):
        return {
            "tasks": {
                "liver": {"source": str(liver), "labels": liver_map},
                "other": {"source": str(other), "labels": labels},
            }
        }

    with pytest.raises(UserError, match="disagree on channel_names"):
        merge_datasets(spec(two_channel, {"1": "spleen"}), tmp_path / "out", 30)
    with pytest.raises(UserError, match="disagree on channel_names"):
        merge_datasets(spec(ct_named_mr, {"1": "spleen"}), tmp_path / "out", 30)
    with pytest.raises(UserError, match=r"\['other'\] of Dataset012_Spleen are not mapped"):
        merge_datasets(spec(spleen, {"spleen": "spleen"}), tmp_path / "out", 30)
    with pytest.raises(UserError, match="not in"):
        merge_datasets(spec(spleen, {"spleen": "spleen", "other": None, "tumour": "x"}), tmp_path / "out", 30)
    with pytest.raises(UserError, match="background"):
        merge_datasets(spec(spleen, {"spleen": "background", "other": None}), tmp_path / "out", 30)
    with pytest.raises(UserError, match="one of the sources"):
        merge_datasets(spec(spleen, {"1": "spleen", "2": None}), raw, 11, force=True)
    with pytest.raises(UserError, match="ambiguous prefixes"):
        merge_datasets(
            {
                "tasks": {
                    "liver": {"source": str(liver), "labels": liver_map},
                    "liver2": {"source": str(liver), "labels": liver_map, "prefix": "liver_x"},
                }
            },
            tmp_path / "out",
            30,
        )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_mots_preset_maps_the_seven_tasks_like_the_paper(tmp_path):
    raw = tmp_path / "raw"
    sources = {
        "liver": write_raw(raw, 3, "Liver", {"background": 0, "liver": 1, "cancer": 2}, n=1),
        "kidney": write_raw(raw, 40, "KiTS19", {"background": 0, "kidney": 1, "tumor": 2}, n=1),
        "hepaticvessel": write_raw(raw, 8, "HepaticVessel", {"background": 0, "Vessel": 1, "Tumour": 2}, n=1),
        "pancreas": write_raw(raw, 7, "Pancreas", {"background": 0, "pancreas": 1, "cancer": 2}, n=1),
        "colon": write_raw(raw, 10, "Colon", {"background": 0, "colon cancer primaries": 1}, n=1),
        "lung": write_raw(raw, 6, "Lung", {"background": 0, "cancer": 1}, n=1),
        "spleen": write_raw(raw, 9, "Spleen", {"background": 0, "spleen": 1}, n=1),
    }
    target, _ = merge_datasets(MOTS_PRESET, raw, 700, sources={k: str(v) for k, v in sources.items()})
    assert target.name == "Dataset700_MOTS"
    dj = json.loads((target / "dataset.json").read_text())
    assert list(dj["labels"]) == [
        "background", "liver", "liver_tumour", "kidney", "kidney_tumour", "hepatic_vessel",
        "hepatic_vessel_tumour", "pancreas", "pancreas_tumour", "colon_tumour", "lung_tumour", "spleen",
    ]  # fmt: skip
    reg = load_task_registry_from_folder(target)
    assert reg.tasks == ("liver", "kidney", "hepaticvessel", "pancreas", "colon", "lung", "spleen")
    assert [reg.label_names_of(t) for t in ("colon", "lung", "spleen", "hepaticvessel")] == [
        ["colon_tumour"], ["lung_tumour"], ["spleen"], ["hepatic_vessel", "hepatic_vessel_tumour"],
    ]  # fmt: skip
    # DoDNet's id2trainId: organ = label >= 1 for liver, kidney, pancreas (nested); hepatic vessel == 1 (not)
    assert [t for t in reg.tasks if reg.nested_of(t)] == ["liver", "kidney", "pancreas"]
    lab = read(target / "labelsTr" / "pancreas_case_000.nii.gz")
    src = read(sources["pancreas"] / "labelsTr" / "case_000.nii.gz")
    np.testing.assert_array_equal(lab, np.select([src == 1, src == 2], [7, 8], 0))


def _liver_spleen_spec(tmp_path: Path, liver: Path, spleen: Path) -> Path:
    spec = tmp_path / "spec.json"
    tasks = {
        "liver": {"source": str(liver), "labels": {"1": "liver", "2": "liver_tumour"}},
        "spleen": {"source": str(spleen), "labels": {"1": "spleen", "2": None}},
    }
    spec.write_text(json.dumps({"tasks": tasks}))
    return spec


def test_merge_refuses_undeclared_label_values_and_geometry_mismatches(sources, tmp_path, capsys):
    """Undeclared values used to become background silently (spleen voxels lost) and geometry was unchecked."""
    raw, liver, spleen = sources
    lab = read(spleen / "labelsTr" / "case_000.nii.gz")
    lab[0, 0, :3] = 5  # a value dataset.json does not declare
    bad = sitk.GetImageFromArray(lab)
    bad.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(bad, str(spleen / "labelsTr" / "case_000.nii.gz"))
    moved = sitk.ReadImage(str(spleen / "labelsTr" / "case_001.nii.gz"))
    moved.SetOrigin((0.0, 0.0, 7.0))
    sitk.WriteImage(moved, str(spleen / "labelsTr" / "case_001.nii.gz"))
    spec = _liver_spleen_spec(tmp_path, liver, spleen)
    before = tree_hash(raw)
    rc = main(["tasks", "merge", "--spec", str(spec), "-d", "30", "--out", str(raw)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "labelsTr/case_000.nii.gz: label values [5] that its dataset.json does not declare" in err
    assert "labelsTr/case_001.nii.gz: geometry differs from case_001_0000.nii.gz: origin" in err
    assert tree_hash(raw) == before and not list(raw.glob("Dataset030_*")) and not list(raw.glob(".*"))


def test_merge_refuses_an_unreadable_source_label_in_one_line(sources, tmp_path, capsys):
    """A label file that is no image was a traceback (the remap read it after the geometry check noted it)."""
    raw, liver, spleen = sources
    (spleen / "labelsTr" / "case_000.nii.gz").write_bytes(b"not a NIfTI file" * 20)
    spec = _liver_spleen_spec(tmp_path, liver, spleen)
    before = tree_hash(raw)
    rc = main(["tasks", "merge", "--spec", str(spec), "-d", "30", "--out", str(raw)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "1 problem(s) in the sources" in err and "labelsTr/case_000.nii.gz: cannot read" in err
    assert tree_hash(raw) == before and not list(raw.glob("Dataset030_*")) and not list(raw.glob(".*"))


def test_merge_force_keeps_the_old_dataset_until_the_new_one_is_in_place(sources, tmp_path, monkeypatch):
    raw, liver, spleen = sources
    spec = {"tasks": {"liver": {"source": str(liver), "labels": {"1": "liver", "2": "liver_tumour"}}}}
    old, _ = merge_datasets(spec, raw, 30)
    old_hash = tree_hash(old)
    import nnunet_ext.core.datasets as datasets

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "atomic_write_json", fail)  # the new dataset fails at its last file
    with pytest.raises(
        UserError, match="cannot write dataset.json of the new dataset.*No space left on device"
    ):
        merge_datasets(spec, raw, 30, force=True)
    assert tree_hash(old) == old_hash  # the old dataset is untouched
    assert sorted(p.name for p in raw.iterdir()) == [
        "Dataset011_Liver",
        "Dataset012_Spleen",
        "Dataset030_Merged",
    ]
