"""Bad input to `nnunet-ext convert / evaluate / submit`: exit 1, one line naming the problem and the fix, no
traceback, nothing written or changed (checksums of the trees before and after)."""

from __future__ import annotations

import errno
import io

import numpy as np
import pytest
import SimpleITK as sitk
from support.challenge_fakes import fake_kipa
from support.refusals import run_refused, tree, truncate  # noqa: F401

from nnunet_ext.challenges import base
from nnunet_ext.challenges import get_challenge as base_challenge
from nnunet_ext.cli import main
from nnunet_ext.core import datasets


@pytest.mark.parametrize(
    "fraction, message",
    [(0.9, "2.nii.gz is truncated or corrupt"), (0.05, "2.nii.gz has no readable NIfTI header (truncated")],
)
def test_convert_refuses_a_truncated_image(tmp_path, capsys, fraction, message):
    src = fake_kipa(tmp_path)
    truncate(src / "train" / "image" / "2.nii.gz", fraction)
    argv = ["convert", "kipa22", str(src), "--id", "11", "--out", str(tmp_path / "raw")]
    run_refused(argv, capsys, tmp_path, message)
    # --skip-bad leaves the truncated case out and says so (a problem of the source)
    assert main([*argv, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert (
        "KiPA_2" in out
        and not (tmp_path / "raw" / "Dataset011_KiPA22" / "imagesTr" / "KiPA_2_0000.nii.gz").exists()
    )


class _FullDisk(io.RawIOBase):
    """A file that accepts a few bytes, then fails as a full disk does."""

    def __init__(self, budget: int):
        self.budget = budget

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(b)
        return len(b)


def test_a_write_failure_is_never_blamed_on_the_source_nor_skipped(tmp_path, capsys, monkeypatch):
    src = fake_kipa(tmp_path)
    real_open = open

    def open_for_output(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp-" in str(path) and str(path).endswith("KiPA_2_0000.nii.gz"):
            return _FullDisk(100)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(datasets, "open", open_for_output, raising=False)  # the raw-dataset writer
    argv = ["convert", "kipa22", str(src), "--id", "11", "--out", str(tmp_path / "raw"), "--skip-bad"]
    run_refused(argv, capsys, tmp_path, "No space left on device; nothing was written")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--tolerance", "-1"], "--tolerance must be a distance in mm >= 0, got -1.0"),
        (["--tolerance", "nan"], "--tolerance must be a distance in mm >= 0"),
        ([], "c.nii.gz is truncated or corrupt"),
    ],
)
def test_evaluate_refuses_bad_tolerances_and_truncated_files(tmp_path, capsys, argv_tail, message):
    label = np.zeros((8, 10, 12), np.uint8)
    label[2:6, 3:7, 3:9] = 1
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / folder / "c.nii.gz"))
    if not argv_tail:
        truncate(tmp_path / "pred" / "c.nii.gz", 0.9)
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--challenge", "kits21", "--quiet"]
    run_refused([*argv, *argv_tail], capsys, tmp_path, message)


def test_an_unwritable_output_is_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    """A full disk or read-only output folder (simulated: root ignores permissions) ends every command with a
    one-line error, exit 1."""
    import nnunet_ext.challenges.evaluate as evaluate

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "atomic_write_json", full_disk)
    label = np.zeros((8, 10, 12), np.uint8)
    label[2:6, 3:7, 3:9] = 1
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / folder / "c.nii.gz"))
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--challenge", "kits21", "--quiet"]
    run_refused(argv, capsys, tmp_path, "error: No space left on device (")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["demo", "--device", "gpu0"],
            "argument -device/--device: 'gpu0' is not a device; use auto, cpu, cuda, cuda:N or mps",
        ),
        (["bench", "--device", "cuda:x"], "'cuda:x' is not a device"),
        (["evaluate", "p", "g"], "the following arguments are required: --challenge"),
        (["fingerprint", "-d", "1", "-np", "0"], "argument -np: must be at least 1, got 0"),
        (
            ["bench", "1", "3d_fullres", "-tr", "X", "--iterations", "0"],
            "argument --iterations: must be at least 1",
        ),
        (
            ["bench", "1", "3d_fullres", "-tr", "X", "--threads", "two"],
            "argument --threads: 'two' is not a whole",
        ),
    ],
)
def test_bad_arguments_are_one_line_with_exit_1(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and message in err and len(err.splitlines()) == 1, err
    assert err.endswith(f"(see nnunet-ext {argv[0]} --help)")


def test_phantom_sizes_are_bounded(tmp_path, capsys):
    argv = [
        "phantoms",
        "full",
        "--id",
        "5",
        "--shape",
        "2000",
        "2000",
        "2000",
        "--out",
        str(tmp_path / "raw"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "8,000,000,000 voxels per case" in err and "pick a smaller --shape" in err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"labels": {"background": 0', "is not valid JSON (Expecting"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"[1, 2]", "holds a JSON list, not the dict expected"),
    ],
)
def test_broken_json_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    """A truncated, non-UTF-8 or wrongly shaped JSON file: the dataset.json `submit` reads, a merge spec."""
    raw = tmp_path / "raw"
    result = base.convert(base_challenge("kipa22"), fake_kipa(tmp_path), 11, out=raw, progress=False)
    (result.folder / "dataset.json").write_bytes(content)
    (tmp_path / "pred").mkdir()
    argv = ["submit", "kipa22", str(tmp_path / "pred"), str(tmp_path / "sub"), "-d", str(result.folder)]
    run_refused(
        argv, capsys, tmp_path, f"the dataset's dataset.json {result.folder / 'dataset.json'} {message}"
    )
    spec = tmp_path / "spec.json"
    spec.write_bytes(content)
    argv = ["tasks", "merge", "--spec", str(spec), "-d", "30", "--out", str(raw)]
    run_refused(argv, capsys, tmp_path, f"the merge spec {spec} {message}")


@pytest.mark.parametrize("name", ["My Sparse", "..", "a/b", "-x", "x.y"])
def test_one_dataset_name_rule_for_every_writer(tmp_path, capsys, monkeypatch, name):
    """labelprop interpolate accepted names that the other commands refuse; now one rule (io)."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    write_phantom_dataset(
        tmp_path / "raw", 580, kind="sparse", num_train=5, num_test=1, shape=(16, 40, 40), every=4
    )
    for argv in (
        ["labelprop", "interpolate", "580", "--out-id", "581", f"--name={name}"],
        ["phantoms", "full", "--id", "582", f"--name={name}", "--out", str(tmp_path / "raw")],
        [
            "convert",
            "kipa22",
            str(fake_kipa(tmp_path / "src")),
            "--id",
            "583",
            f"--name={name}",
            "--out",
            str(tmp_path / "raw"),
        ],
    ):
        run_refused(argv, capsys, tmp_path / "raw", f"invalid dataset name {name!r}; use letters, digits")


def test_labelprop_copy_instead_of_hard_links(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    src = write_phantom_dataset(
        tmp_path / "raw", 584, kind="sparse", num_train=5, num_test=1, shape=(16, 40, 40), every=4
    )
    image = sorted((src / "imagesTr").iterdir())[0]
    assert main(["labelprop", "interpolate", "584", "--out-id", "585", "--quiet"]) == 0
    assert main(["labelprop", "interpolate", "584", "--out-id", "586", "--quiet", "--copy"]) == 0
    linked = next((tmp_path / "raw").glob("Dataset585_*")) / "imagesTr" / image.name
    copied = next((tmp_path / "raw").glob("Dataset586_*")) / "imagesTr" / image.name
    assert linked.stat().st_ino == image.stat().st_ino  # default: the same file as the source
    assert copied.stat().st_ino != image.stat().st_ino and copied.read_bytes() == image.read_bytes()
