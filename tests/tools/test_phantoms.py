"""Synthetic phantoms: anatomy, intensities, determinism, the four dataset variants (checked with nnU-Net's
own verify_dataset_integrity), safe writing, the CLI; plus the nnunet_ext.core.io helpers they use."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import atomic_write_image, atomic_write_json, refuse_existing
from nnunet_ext.multitask.tasks import load_task_registry_from_folder
from nnunet_ext.tools import phantoms
from nnunet_ext.tools.phantoms import (
    FULL_LABELS,
    IGNORE_LABEL,
    PARTIAL_LABELS,
    make_case,
    make_case_parts,
    write_phantom_dataset,
)

SHAPE = (16, 40, 40)
SPACING = (2.5, 1.5, 1.5)
SEEDS = range(6)
SIX = ndimage.generate_binary_structure(3, 1)


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def run_cli(argv: list[str]) -> int:
    """``nnunet-ext`` through cli.main, or (while another command module is missing) a parser that only
    knows ``phantoms``, with cli.main's error handling."""
    try:
        from nnunet_ext import cli

        return cli.main(argv)
    except (ImportError, AttributeError):
        pass
    parser = argparse.ArgumentParser(prog="nnunet-ext")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    phantoms.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"nnunet-ext {args.command}: error: {e}", file=sys.stderr)
        return 1


@pytest.fixture(scope="module")
def cases():
    return [make_case_parts(np.random.default_rng(s), SHAPE, SPACING) for s in SEEDS]


# ------------------------------------------------------------------------------------------- one case


def test_make_case_types_and_determinism():
    channels, label = make_case(np.random.default_rng(3), SHAPE, SPACING)
    assert len(channels) == 1 and channels[0].dtype == np.float32 and channels[0].shape == SHAPE
    assert label.dtype == np.uint8 and label.shape == SHAPE
    assert set(np.unique(label)) <= set(FULL_LABELS.values())
    channels2, label2 = make_case(np.random.default_rng(3), SHAPE, SPACING)
    np.testing.assert_array_equal(channels[0], channels2[0])
    np.testing.assert_array_equal(label, label2)
    channels3, label3 = make_case(np.random.default_rng(4), SHAPE, SPACING)
    assert not np.array_equal(label, label3) and not np.allclose(channels[0], channels3[0])


def test_every_structure_present(cases):
    for c in cases:
        assert set(np.unique(c.label_full)) == set(FULL_LABELS.values())


def test_organs_share_boundaries(cases):
    """Liver abuts kidney in every case (6-neighbourhood); spleen abuts kidney in most."""

    def touch(label, a, b):
        return bool((ndimage.binary_dilation(label == a, SIX) & (label == b)).any())

    assert all(touch(c.label_full, FULL_LABELS["liver"], FULL_LABELS["kidney"]) for c in cases)
    assert (
        sum(touch(c.label_full, FULL_LABELS["spleen"], FULL_LABELS["kidney"]) for c in cases)
        >= len(cases) // 2
    )


def test_tumours_inside_their_organ(cases):
    for c in cases:
        for host in (phantoms.LIVER, phantoms.KIDNEY):
            tumour = c.tumour_host == host
            assert tumour.any()
            assert np.all((c.organs == host)[ndimage.binary_dilation(tumour, SIX)])
        # in the label map no tumour voxel touches background
        near = ndimage.binary_dilation(c.label_full == FULL_LABELS["tumour"], SIX)
        assert not np.any(near & (c.label_full == 0))


def test_vessels_present_and_thin(cases):
    for c in cases:
        vessel = c.label_full == FULL_LABELS["vessel"]
        assert vessel.sum() > 10
        assert vessel.mean() < 0.02
        # in-plane distance to the vessel's border (voxels): radius ~1-1.5, a little more where curves cross
        depth = np.concatenate([ndimage.distance_transform_edt(s)[s] for s in vessel if s.any()])
        assert depth.max() <= 3.0 and np.percentile(depth, 95) <= 2.0
        ct = c.channels[0]
        assert ct[vessel].mean() > ct[c.label_full == FULL_LABELS["liver"]].mean() + 40  # contrast-bright


def test_ct_intensities_plausible(cases):
    for c in cases:
        ct, lab = c.channels[0], c.label_full
        assert np.median(ct[:, :2, :2]) < -900  # air in the corners
        assert ((ct > -160) & (ct < -40)).mean() > 0.05  # fat
        cores = {k: ndimage.binary_erosion(lab == FULL_LABELS[k]) for k in ("liver", "kidney", "spleen")}
        organ_means = {k: float(np.median(ct[m])) for k, m in cores.items() if m.sum() >= 10}  # no rim blur
        assert "liver" in organ_means and "spleen" in organ_means
        assert all(80 < v < 200 for v in organ_means.values()), organ_means  # contrast-enhanced
        assert organ_means["liver"] > organ_means["spleen"]
        for host in (phantoms.LIVER, phantoms.KIDNEY):
            core = ndimage.binary_erosion(c.tumour_host == host) & (lab == FULL_LABELS["tumour"])
            if core.sum() >= 10:  # hypodense (tiny tumours are blurred into their rim: not checked)
                assert np.median(ct[core]) < np.median(ct[ndimage.binary_erosion(lab == host)]) - 10
        assert ct.std() > 100 and np.isfinite(ct).all()


def test_converge_profile_same_anatomy_higher_contrast(tmp_path):
    """The convergence-benchmark profile: the organs of a seed are those of the standard profile (same draws),
    organs are 50+ HU apart, tumours larger and in an intensity band of their own (inside the foreground's range, so CT normalisation keeps it), vessels thicker, noise lower; datasets record the profile and
    default to its small shape."""
    shape = phantoms.PROFILE_SHAPES["converge"]
    std = [make_case_parts(np.random.default_rng(s), shape, SPACING) for s in SEEDS]
    easy = [make_case_parts(np.random.default_rng(s), shape, SPACING, profile="converge") for s in SEEDS]
    tumour_std = tumour_easy = vessel_std = vessel_easy = 0
    for a, b in zip(std, easy):
        np.testing.assert_array_equal(a.organs, b.organs)
        tumour_std, tumour_easy = (
            tumour_std + (a.tumour_host > 0).sum(),
            tumour_easy + (b.tumour_host > 0).sum(),
        )
        vessel_std, vessel_easy = vessel_std + a.vessel.sum(), vessel_easy + b.vessel.sum()
        ct, lab = b.channels[0], b.label_full
        cores = {k: ndimage.binary_erosion(lab == FULL_LABELS[k]) for k in ("liver", "kidney", "spleen")}
        med = {k: float(np.median(ct[m])) for k, m in cores.items() if m.sum() >= 10}
        assert med["liver"] - med["spleen"] > 50 and med.get("kidney", 1e9) - med["liver"] > 50, med
        tumour = ndimage.binary_erosion(lab == FULL_LABELS["tumour"])
        if (
            tumour.sum() >= 10
        ):  # tumours in a band of their own, between spleen and liver (both hosts brighter)
            t = float(np.median(ct[tumour]))
            assert med["spleen"] + 15 < t < med["liver"] - 15 and t < med.get("kidney", 1e9) - 60, (med, t)
            # nnU-Net's CT normalisation clips at the foreground's 0.5 percentile: the tumours stay well above it
            assert t - np.percentile(ct[lab > 0], 0.5) > 20
        flat = ndimage.binary_erosion(cores["liver"], iterations=2) & (b.tumour_host == 0) & ~b.vessel
        if flat.sum() > 50:  # noise + texture inside the liver
            assert np.std(ct[flat]) < np.std(a.channels[0][flat])
    assert tumour_easy > tumour_std and vessel_easy > vessel_std
    folder = phantoms.write_phantom_dataset(tmp_path, 7, num_train=2, num_test=0, profile="converge")
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["nnunet_ext_phantom"]["profile"] == "converge" and dj["nnunet_ext_phantom"]["shape"] == list(
        shape
    )
    with pytest.raises(UserError, match="unknown phantom profile 'hard'"):
        phantoms.write_phantom_dataset(tmp_path, 8, profile="hard")


def test_multimodal_second_contrast():
    channels, label = make_case(np.random.default_rng(1), SHAPE, SPACING, num_channels=2)
    ct, mr = channels
    assert mr.dtype == np.float32 and mr.min() >= 0
    # contrasts differ between channels: liver is brighter than spleen in CT, darker in the MR
    liver, spleen = label == FULL_LABELS["liver"], label == FULL_LABELS["spleen"]
    assert ct[liver].mean() > ct[spleen].mean() and mr[liver].mean() < mr[spleen].mean()


# -------------------------------------------------------------------------------------------- datasets

KW = {"num_train": 3, "num_test": 1, "shape": SHAPE, "spacing": SPACING, "seed": 5}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {
        kind: write_phantom_dataset(root, 100 + i, kind=kind, every=3, **KW)
        for i, kind in enumerate(phantoms.KINDS)
    }


def test_dataset_layout(datasets):
    names = {k: p.name for k, p in datasets.items()}
    assert names == {
        "full": "Dataset100_Phantom",
        "partial": "Dataset101_PhantomPartial",
        "sparse": "Dataset102_PhantomSparse",
        "multimodal": "Dataset103_PhantomMultimodal",
    }
    for kind, folder in datasets.items():
        dj = json.loads((folder / "dataset.json").read_text())
        assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
        assert len(list((folder / "labelsTr").iterdir())) == 3
        assert len(list((folder / "labelsTs").iterdir())) == 1
        n_ch = 2 if kind == "multimodal" else 1
        assert dj["channel_names"] == ({"0": "CT", "1": "MR"} if n_ch == 2 else {"0": "CT"})
        assert len(list((folder / "imagesTr").iterdir())) == 3 * n_ch
        assert len(list((folder / "imagesTs").iterdir())) == n_ch


def test_spacing_and_orientation_written(datasets):
    folder = datasets["full"]
    image = sitk.ReadImage(str(next((folder / "imagesTr").glob("*_0000.nii.gz"))))
    assert np.allclose(image.GetSpacing(), SPACING[::-1])  # SimpleITK: (x, y, z)
    assert image.GetSize() == SHAPE[::-1]
    assert sitk.GetArrayFromImage(image).shape == SHAPE
    label = sitk.ReadImage(str(next((folder / "labelsTr").glob("*.nii.gz"))))
    assert label.GetPixelID() == sitk.sitkUInt8 and np.allclose(label.GetSpacing(), SPACING[::-1])


def test_dataset_matches_make_case(datasets):
    """Case i of a dataset is make_case(default_rng([seed, i, 0])): reproducible from the seed."""
    channels, label = make_case(np.random.default_rng([KW["seed"], 0, 0]), SHAPE, SPACING)
    folder = datasets["full"]
    np.testing.assert_array_equal(read(folder / "labelsTr" / "phantom_000.nii.gz"), label)
    np.testing.assert_allclose(read(folder / "imagesTr" / "phantom_000_0000.nii.gz"), channels[0])


@pytest.mark.parametrize("kind", phantoms.KINDS)
def test_nnunet_verify_dataset_integrity(datasets, kind):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(datasets[kind]), num_processes=1)  # raises on any problem


def test_partial_variant(datasets):
    folder = datasets["partial"]
    reg = load_task_registry_from_folder(folder)
    assert reg.tasks == ("liver", "kidney", "spleen")
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == PARTIAL_LABELS
    for path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        case = path.name[: -len(".nii.gz")]
        task_labels = set(reg.labels_of(reg.task_of(case)))
        partial = read(path)
        full = read(folder / "labelsTr_full" / path.name)
        present = set(np.unique(partial).tolist()) - {0}
        assert present and present <= task_labels, (case, present)
        in_task = np.isin(full, list(task_labels))
        np.testing.assert_array_equal(partial[in_task], full[in_task])
        assert np.all(partial[~in_task] == 0)
        assert set(np.unique(full).tolist()) == set(PARTIAL_LABELS.values())  # full truth has everything
    test_label = read(next((folder / "labelsTs").glob("*.nii.gz")))
    assert set(np.unique(test_label).tolist()) == set(PARTIAL_LABELS.values())


def test_sparse_variant(datasets):
    folder = datasets["sparse"]
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == IGNORE_LABEL == max(dj["labels"].values())
    every = dj["nnunet_ext_phantom"]["every"]
    assert every == 3
    offsets = []
    for path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        sparse, dense = read(path), read(folder / "labelsTr_dense" / path.name)
        annotated = np.array([not np.all(s == IGNORE_LABEL) for s in sparse])
        idx = np.flatnonzero(annotated)
        assert len(idx) == len(range(idx[0], SHAPE[0], every)) and np.all(np.diff(idx) == every)
        assert idx[0] < every
        offsets.append(int(idx[0]))
        assert np.all(sparse[~annotated] == IGNORE_LABEL)
        assert not np.any(sparse[annotated] == IGNORE_LABEL)
        np.testing.assert_array_equal(sparse[annotated], dense[annotated])
        assert IGNORE_LABEL not in dense
    test_label = read(next((folder / "labelsTs").glob("*.nii.gz")))
    assert IGNORE_LABEL not in test_label  # test truth is dense


def test_refuses_existing_id_and_force_replaces(tmp_path):
    kw = {**KW, "num_train": 2, "num_test": 0}
    first = write_phantom_dataset(tmp_path, 7, name="First", **kw)
    with pytest.raises(UserError) as e:
        write_phantom_dataset(tmp_path, 7, name="Second", **kw)
    assert str(first) in str(e.value) and "--force" in str(e.value)
    second = write_phantom_dataset(tmp_path, 7, name="Second", force=True, **kw)
    assert not first.exists() and second.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset007_Second"]  # no temp folder left


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = phantoms.make_case_parts

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(phantoms, "make_case_parts", failing)
    with pytest.raises(KeyboardInterrupt):
        write_phantom_dataset(tmp_path, 8, **KW)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"kind": "nope"}, "unknown phantom kind"),
        ({"dataset_id": 1000}, "1 to 999"),
        ({"num_train": 1}, "at least 2"),
        ({"kind": "partial", "num_train": 2}, "one per task"),
        ({"shape": (8, 64, 64)}, "too small"),
        ({"spacing": (2.5, 0, 1)}, "positive"),
        ({"kind": "sparse", "every": 1}, "--every"),
        ({"name": "bad name"}, "invalid dataset name"),
    ],
)
def test_argument_validation(tmp_path, kwargs, text):
    args = {"raw_root": tmp_path, "dataset_id": 9, **KW, **kwargs}
    with pytest.raises(UserError, match=text):
        write_phantom_dataset(**args)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, monkeypatch, capsys):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    argv = [
        "phantoms",
        "sparse",
        "--id",
        "11",
        "--shape",
        "16",
        "40",
        "40",
        "--num-train",
        "2",
        "--num-test",
        "1",
    ]
    assert run_cli(argv + ["--every", "2"]) == 1  # no --out and no nnUNet_raw
    assert "export nnUNet_raw=" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert run_cli(argv + ["--every", "2"]) == 0
    out = capsys.readouterr().out
    assert "Dataset011_PhantomSparse" in out
    dj = json.loads((tmp_path / "Dataset011_PhantomSparse" / "dataset.json").read_text())
    assert dj["nnunet_ext_phantom"]["every"] == 2 and dj["numTraining"] == 2
    assert run_cli(argv) == 1  # exists
    assert "--force" in capsys.readouterr().err
    assert run_cli(argv + ["--force", "--name", "Other", "--out", str(tmp_path / "o")]) == 0
    assert run_cli(argv + ["--force", "--every", "1"]) == 1
    assert run_cli(["phantoms", "full", "--id", "12", "--num-train", "1"]) == 1
    with pytest.raises(SystemExit):  # --every belongs to the sparse variant only
        run_cli(["phantoms", "full", "--id", "12", "--every", "2"])


# -------------------------------------------------------------------------------------------- io helpers


def test_atomic_write_image_axis_order(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (z, y, x)
    path = atomic_write_image(tmp_path / "a.nii.gz", array, (3.0, 2.0, 0.5), origin=(1, 2, 3))
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (4, 3, 2)
    assert np.allclose(image.GetSpacing(), (0.5, 2.0, 3.0))
    assert np.allclose(image.GetOrigin(), (1, 2, 3))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert atomic_write_image(tmp_path / "b.nii.gz", array > 5, (1, 1, 1)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(ValueError):
        atomic_write_image(tmp_path / "c.nii.gz", array, (1.0, 1.0))


def test_atomic_write_json_and_refuse_existing(tmp_path):
    obj = {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "d": np.bool_(True), "p": tmp_path}
    path = atomic_write_json(tmp_path / "x.json", obj)
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": [0, 1, 2], "d": True, "p": str(tmp_path)}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "y.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    refuse_existing(tmp_path / "missing", False, "a file")
    refuse_existing(path, True, "a file")
    with pytest.raises(UserError, match="pass --force") as e:
        refuse_existing(path, False, "the output")
    assert str(path) in str(e.value)
