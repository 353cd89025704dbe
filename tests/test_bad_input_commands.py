"""Bad input to `nnunet-ext medseqft select / run`, `labelprop qc / pseudo` and `uniseg merge` (issue 17): exit 1,
one line naming the file or argument and the fix, no traceback, nothing written or changed (checksums of the
trees before and after). Tiny hand-made inputs only: no training, no planning."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from support.medseqft_env import DATA, _fake_preprocessed, _medseqft_env  # noqa: F401
from support.refusals import run_refused, tree, truncate

from nnunet_ext.cli import main


class _Kept:
    """capsys for :func:`run_refused` that keeps what it read, so the test can also check it is one line."""

    def __init__(self, capsys):
        self.capsys, self.err = capsys, ""

    def readouterr(self):
        out = self.capsys.readouterr()
        self.err = out.err.strip()
        return out


def refused(argv, capsys, root: Path, message: str) -> str:
    """:func:`run_refused` (exit 1, message, no traceback, ``root`` unchanged) and a one-line message."""
    kept = _Kept(capsys)
    run_refused(argv, kept, root, message)
    assert len(kept.err.splitlines()) == 1, kept.err
    return kept.err


BROKEN_JSON = [
    (b'{"buffer": ["case_a", ', "is not valid JSON (Expecting"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b'["case_a"]', "holds a JSON list, not the dict expected"),
]


# ------------------------------------------------------------------------------------------- --device
SELECT = ["medseqft", "select", "611", "3d_fullres"]
RUN_611 = ["-d", "611", "-c", "3d_fullres", "-o"]  # medseqft run's dataset, configuration and output flags
RUN = ["medseqft", "run", "--pretrained", "m0.pth", "-d", "1", "-c", "3d_fullres", "-o", "o"]


@pytest.mark.parametrize(
    "argv",
    [
        ["medseqft", "select", "1", "3d_fullres", "--checkpoint", "m0.pth", "--device", "gpu0"],
        ["medseqft", "select", "1", "3d_fullres", "--checkpoint", "m0.pth", "--device", "cuda:x"],
        [*RUN, "--device", "gpu"],
        [*RUN, "--device", ""],
    ],
)
def test_an_invalid_device_is_a_one_line_argparse_error(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and len(err.splitlines()) == 1, err
    assert (
        re.search(r"argument (-device/)?--device:", err)
        and "is not a device; use auto, cpu, cuda, cuda:N or mps" in err
    ), err
    assert not any(tmp_path.iterdir())


def test_medseqft_device_defaults_to_auto():
    from nnunet_ext.cli import build_parser

    parser = build_parser("medseqft")
    select = parser.parse_args(["medseqft", "select", "1", "3d_fullres", "--checkpoint", "m0.pth"])
    run = parser.parse_args(["medseqft", "run", "--pretrained", "m", "-d", "1", "-c", "c", "-o", "o"])
    assert select.device == run.device == "auto"
    from nnunet_ext.core.inference import torch_device as resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")


def test_medseqft_run_refuses_a_device_this_machine_lacks(tmp_path, capsys):
    pretrained = tmp_path / "m0.pth"
    pretrained.write_bytes(b"x")
    argv = [
        "medseqft",
        "run",
        "--pretrained",
        str(pretrained),
        "-d",
        "1",
        "-c",
        "c",
        "-o",
        str(tmp_path / "o"),
    ]
    refused([*argv, "--device", "cuda:99"], capsys, tmp_path, "--device cuda:99")


# ------------------------------------------------------------------------------------------ medseqft


def _write_checkpoint(path: Path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    else:  # a real torch file cut short (a copy interrupted, a full disk while saving)
        torch.save({"network_weights": {"w": torch.zeros(64, 64)}, "init_args": {}}, path)
        truncate(path, 0.5)


@pytest.mark.parametrize("kind", ["garbage", "empty", "text", "truncated"])
def test_medseqft_select_refuses_an_unreadable_checkpoint(tmp_path, capsys, monkeypatch, kind):
    _medseqft_env(tmp_path, monkeypatch)
    ckpt = tmp_path / "m0.pth"
    _write_checkpoint(ckpt, kind)
    argv = [*SELECT, "--checkpoint", str(ckpt), "-f", "all", "--device", "cpu"]
    err = refused(argv, capsys, tmp_path, f"checkpoint {ckpt} is not a readable PyTorch checkpoint (")
    assert "checkpoint_final.pth written by nnUNetv2_train, or retrain that fold" in err


def test_medseqft_select_refuses_a_checkpoint_that_is_no_nnunet_checkpoint(tmp_path, capsys, monkeypatch):
    _medseqft_env(tmp_path, monkeypatch)
    ckpt = tmp_path / "m0.pth"
    torch.save({"state_dict": {}}, ckpt)
    argv = [*SELECT, "--checkpoint", str(ckpt), "-f", "all", "--device", "cpu"]
    refused(
        argv, capsys, tmp_path, f"{ckpt} is not an nnU-Net v2 checkpoint (no network_weights / init_args)"
    )


@pytest.mark.parametrize("content, message", BROKEN_JSON)
def test_medseqft_select_refuses_a_broken_buffer_file_before_scoring(
    tmp_path, capsys, monkeypatch, content, message
):
    base = _medseqft_env(tmp_path, monkeypatch)
    for buffer, extra in (
        (tmp_path / "buffer.json", ["-o", str(tmp_path / "buffer.json")]),
        (base / "medseqft_buffer.json", []),
    ):
        buffer.write_bytes(content)
        argv = ["medseqft", "select", "611", "3d_fullres", "--checkpoint", str(tmp_path / "none.pth"), *extra]
        err = refused(argv, capsys, tmp_path, f"the MDS buffer file {buffer} {message}")
        assert "pass --overwrite to select the buffer again" in err


def test_medseqft_select_refuses_a_broken_plans_file(tmp_path, capsys, monkeypatch):
    base = _medseqft_env(tmp_path, monkeypatch)
    truncate(base / "nnUNetPlans.json")
    argv = ["medseqft", "select", "611", "3d_fullres", "--checkpoint", str(tmp_path / "none.pth")]
    refused(argv, capsys, tmp_path, f"the plans file {base / 'nnUNetPlans.json'} is not valid JSON")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_medseqft_run_refuses_an_unreadable_pretrained_checkpoint(tmp_path, capsys, monkeypatch, kind):
    _medseqft_env(tmp_path, monkeypatch)
    ckpt = tmp_path / "m0.pth"
    _write_checkpoint(ckpt, kind)
    argv = ["medseqft", "run", "--pretrained", str(ckpt), *RUN_611, str(tmp_path / "o")]
    err = refused(
        [*argv, "--device", "cpu"], capsys, tmp_path, f"the pretrained checkpoint {ckpt} is not a readable"
    )
    assert "pass M_0's fold_X/checkpoint_final.pth" in err


@pytest.mark.parametrize("content, message", BROKEN_JSON)
def test_medseqft_run_refuses_a_broken_state_or_buffer_file(tmp_path, capsys, monkeypatch, content, message):
    """The run's state file (medseqft_run.json) and a task's buffer file: refused before anything is written or
    trained (the architecture check is stubbed: the checkpoint here is not a network)."""
    import nnunet_ext.medseqft.run as medseqft_run

    base = _medseqft_env(tmp_path, monkeypatch)
    monkeypatch.setattr(medseqft_run, "check_compatible", lambda *a, **k: None)
    ckpt = tmp_path / "m0.pth"
    ckpt.write_bytes(b"x")
    out = tmp_path / "o"
    out.mkdir()
    state = out / "medseqft_run.json"
    state.write_bytes(content)
    argv = ["medseqft", "run", "--pretrained", str(ckpt), *RUN_611, str(out), "--device", "cpu"]
    err = refused(
        [*argv, "--strategies", "sequential"], capsys, tmp_path, f"the run's state file {state} {message}"
    )
    assert "pass --overwrite to start the run again" in err
    state.unlink()
    buffer = base / "medseqft_buffer.json"
    buffer.write_bytes(content)
    refused([*argv, "--strategies", "medseqft"], capsys, tmp_path, f"the MDS buffer file {buffer} {message}")


def test_trainer_buffer_reader_names_the_file(tmp_path):
    from nnunet_ext.core.errors import UserError
    from nnunet_ext.medseqft.method import BUFFER_FILE, load_buffer

    (tmp_path / BUFFER_FILE).write_bytes(b'{"buffer": [')
    with pytest.raises(
        UserError, match="the MDS buffer file .* is not valid JSON .*nnunet-ext medseqft select"
    ):
        load_buffer(tmp_path)
    (tmp_path / BUFFER_FILE).write_text('{"buffer": "case_a"}')
    with pytest.raises(UserError, match="'buffer' must be a list of case identifiers"):
        load_buffer(tmp_path)


# ------------------------------------------------------------------------------------------ labelprop
@pytest.fixture
def labelprop_raw(tmp_path, monkeypatch):
    """A sparse phantom source (580) and the dataset `labelprop interpolate` wrote from it (581)."""
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    src = write_phantom_dataset(raw, 580, kind="sparse", num_train=2, num_test=0, shape=(16, 40, 40), every=4)
    assert main(["labelprop", "interpolate", "580", "--out-id", "581", "--quiet", "--method", "nearest"]) == 0
    return src, next(raw.glob("Dataset581_*"))


@pytest.mark.parametrize("content, message", BROKEN_JSON)
@pytest.mark.parametrize("which", ["labelprop.json", "dataset.json"])
def test_labelprop_qc_refuses_a_broken_record(tmp_path, capsys, labelprop_raw, which, content, message):
    _, interp = labelprop_raw
    (interp / which).write_bytes(content)
    what = "the label propagation record" if which == "labelprop.json" else "the dataset's dataset.json"
    if which == "dataset.json":  # qc finds the dataset by its folder (dataset.json present)
        argv = ["labelprop", "qc", str(interp), "-o", str(tmp_path / "qc"), "--quiet"]
    else:
        argv = ["labelprop", "qc", "581", "-o", str(tmp_path / "qc"), "--quiet"]
    err = refused(argv, capsys, tmp_path, f"{what} {interp / which} {message}")
    assert "labelprop interpolate` / `pseudo` (--force), or repair the file" in err


def test_labelprop_qc_refuses_a_record_without_cases(tmp_path, capsys, labelprop_raw):
    _, interp = labelprop_raw
    (interp / "labelprop.json").write_text('{"step": "interpolate"}')
    argv = ["labelprop", "qc", "581", "-o", str(tmp_path / "qc"), "--quiet"]
    refused(argv, capsys, tmp_path, "lacks 'cases' / 'axis' / 'step'")


@pytest.mark.parametrize("content, message", BROKEN_JSON)
def test_labelprop_pseudo_refuses_a_broken_model_dataset_json(
    tmp_path, capsys, labelprop_raw, content, message
):
    src, _ = labelprop_raw
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    (model / "dataset.json").write_bytes(content)
    argv = [
        "labelprop",
        "pseudo",
        str(src),
        "--out-id",
        "582",
        "--model",
        str(model),
        "--quiet",
        "--device",
        "cpu",
    ]
    err = refused(argv, capsys, tmp_path, f"the model's dataset.json {model / 'dataset.json'} {message}")
    assert "copy the dataset.json of the dataset the model was trained on" in err


@pytest.mark.parametrize("content, message", BROKEN_JSON[:2])
def test_labelprop_refuses_a_broken_source_dataset_json(tmp_path, capsys, labelprop_raw, content, message):
    src, _ = labelprop_raw
    (src / "dataset.json").write_bytes(content)
    argv = ["labelprop", "interpolate", str(src), "--out-id", "583", "--quiet"]
    refused(argv, capsys, tmp_path, f"the dataset's dataset.json {src / 'dataset.json'} {message}")


# ------------------------------------------------------------------------------------------ uniseg merge
@pytest.fixture
def uniseg_merged(tmp_path, monkeypatch):
    """Two tiny phantom sources (1 and 2 channels) and their UniSeg merge Dataset603_Mixed (written by the CLI)."""
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    kw = dict(num_train=2, num_test=1, shape=(16, 40, 40))
    ct = write_phantom_dataset(raw, 601, "full", seed=1, **kw)
    mm = write_phantom_dataset(raw, 602, "multimodal", seed=2, **kw)
    none = {"liver": None, "kidney": None, "spleen": None, "tumour": None, "vessel": None}
    spec = {
        "tasks": {
            "organs": {"source": str(ct), "labels": {**none, "liver": "liver", "kidney": "kidney"}},
            "spleenmm": {"source": str(mm), "labels": {**none, "spleen": "spleen", "tumour": "tumour"}},
        }
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    argv = ["uniseg", "merge", "--spec", str(spec_file), "--id", "603", "--name", "Mixed"]
    assert main(argv) == 0
    merged = raw / "Dataset603_Mixed"
    assert (merged / "imagesTr").is_dir() and (merged / "labelsTs").is_dir()
    return raw, ct, mm, merged, [*argv, "--force"]


DATASETS = ["Dataset601_Phantom", "Dataset602_PhantomMultimodal", "Dataset603_Mixed"]


def _set_label(path: Path, value: int) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path), True)


def _shift_origin(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    image.SetOrigin([o + 5.0 for o in image.GetOrigin()])
    sitk.WriteImage(image, str(path), True)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("undeclared", "label values [9] that its dataset.json does not declare"),
        ("garbage", "cannot read the headers of"),
        ("geometry", "geometry differs from"),
    ],
)
def test_uniseg_merge_force_failing_midway_leaves_the_old_dataset(
    tmp_path, capsys, uniseg_merged, breakage, message
):
    """--force replaces the old merge only once the new one is complete: a source problem found while writing
    (the second task's last label) leaves the old dataset, byte for byte, and no temporary folder."""
    raw, _, mm, merged, argv = uniseg_merged
    label = sorted((mm / "labelsTs").iterdir())[-1]
    if breakage == "undeclared":
        _set_label(label, 9)
    elif breakage == "garbage":
        label.write_bytes(b"not a NIfTI file at all" * 10)
    else:
        _shift_origin(label)
    old = tree(merged)
    err = refused(argv, capsys, raw, message)
    assert "1 problem(s) in the sources (nothing was written)" in err and label.name in err
    assert tree(merged) == old and sorted(p.name for p in raw.iterdir()) == DATASETS


def test_uniseg_merge_force_with_a_full_disk_leaves_the_old_dataset(
    tmp_path, capsys, monkeypatch, uniseg_merged
):
    import nnunet_ext.core.datasets as datasets

    raw, _, _, merged, argv = uniseg_merged

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(datasets, "atomic_write_json", full_disk)  # the writer's last file
    err = refused(argv, capsys, raw, "cannot write dataset.json of the new dataset in")
    assert "No space left on device" in err
    assert (merged / "dataset.json").is_file()


def test_uniseg_merge_force_replaces_the_old_dataset(tmp_path, capsys, uniseg_merged):
    raw, ct, _, merged, argv = uniseg_merged
    (merged / "stale.txt").write_text("from the old merge")
    assert main(argv) == 0
    assert not (merged / "stale.txt").exists() and (merged / "dataset.json").is_file()
    assert sorted(p.name for p in raw.iterdir()) == DATASETS  # the old one is gone, no temporary folder


def test_uniseg_merge_force_never_deletes_the_old_dataset_before_the_new_one_is_in_place(
    tmp_path, monkeypatch, uniseg_merged
):
    """Issue 17: with an old dataset that cannot be deleted completely (e.g. an unwritable labelsTr/), deleting
    it first lost imagesTr/ and left no new dataset. Now the old one is moved aside, the new one renamed into
    place, and only then is the old one deleted (a failure there leaves a hidden leftover, never a gap)."""
    raw, _, _, merged, argv = uniseg_merged
    real_rmtree = shutil.rmtree

    def stuck_rmtree(path, ignore_errors=False, *args, **kwargs):
        name = Path(path).name
        if name.startswith(("Dataset603_", ".Dataset603_Mixed.old-")):
            inner = Path(path) if name.startswith("Dataset603_") else Path(path) / "Dataset603_Mixed"
            real_rmtree(inner / "imagesTr", ignore_errors=True)  # deleted before the failure
            if ignore_errors:
                return
            raise PermissionError(errno.EACCES, "Permission denied", str(inner / "labelsTr"))
        return real_rmtree(path, ignore_errors, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stuck_rmtree)
    (merged / "stale.txt").write_text("from the old merge")
    assert main(argv) == 0
    assert not (merged / "stale.txt").exists()
    assert len(list((merged / "imagesTr").iterdir())) == 2 * 2 * 2  # 2 tasks x 2 cases x 2 channels
    assert len(list((merged / "labelsTs").iterdir())) == 2 and (merged / "dataset.json").is_file()
