"""File helpers: atomic writes keep permissions as a user expects (not tempfile's 0600 / 0700)."""

from __future__ import annotations

import os
import stat

import pytest
from support.paths import REPO

from nnunet_ext.core.datasets import replace_dataset
from nnunet_ext.core.io import atomic_write_json, atomic_write_text, make_temp_dir


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask022):
    new = atomic_write_json(tmp_path / "new.json", {"a": 1})
    assert mode(new) == 0o644
    shared = tmp_path / "plans.json"
    shared.write_text("{}")
    shared.chmod(0o664)
    atomic_write_text(shared, '{"b": 2}')
    assert mode(shared) == 0o664 and shared.read_text() == '{"b": 2}'
    os.umask(0o077)
    assert mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600


def test_dataset_folders_follow_the_umask(tmp_path, umask022):
    tmp = make_temp_dir(".Dataset001_X.tmp-", tmp_path)
    assert mode(tmp) == 0o755
    (tmp / "dataset.json").write_text("{}")
    target = replace_dataset(tmp, tmp_path / "Dataset001_X", 1)
    assert mode(target) == 0o755 and (target / "dataset.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset001_X"]  # nothing left aside


def test_replace_dataset_puts_the_old_dataset_back_if_the_swap_fails(tmp_path, monkeypatch):
    old = tmp_path / "Dataset001_Old"
    (old / "labelsTr").mkdir(parents=True)
    (old / "dataset.json").write_text('{"old": true}')
    tmp = make_temp_dir(".Dataset001_New.tmp-", tmp_path)
    real_replace = os.replace

    def failing(src, dst):
        if os.fspath(src) == os.fspath(tmp):  # the new dataset's rename into place
            raise OSError(28, "No space left on device", os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        replace_dataset(tmp, tmp_path / "Dataset001_New", 1)
    assert (old / "dataset.json").read_text() == '{"old": true}' and (old / "labelsTr").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["Dataset001_Old", tmp.name])


# ------------------------------------------------------------------------------ the one raw-dataset writer
def _write_one(root, dataset_id=7, name="Toy", force=False, fail=False, **kwargs):
    import numpy as np

    from nnunet_ext.core.datasets import RawDatasetWriter

    with RawDatasetWriter(root, dataset_id, name, force, **kwargs) as writer:
        writer.write_array(np.zeros((2, 3, 4), np.uint8), "labelsTr", "a.nii.gz", (2.0, 1.0, 1.0))
        if fail:
            raise RuntimeError("interrupted")
        return writer.finish({"name": name}, {"extra.json": {"k": 1}})


def test_writer_swaps_a_complete_dataset_in_and_leaves_nothing_on_failure(tmp_path):
    import json

    from nnunet_ext.core.errors import UserError

    target = _write_one(tmp_path)
    assert target == tmp_path / "Dataset007_Toy"
    assert json.loads((target / "extra.json").read_text()) == {"k": 1}
    assert sorted(p.name for p in target.iterdir()) == ["dataset.json", "extra.json", "labelsTr"]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="interrupted"):  # a failure before finish: no trace, old data kept
        _write_one(tmp_path, name="Other", force=True, fail=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UserError, match="already exists.*pass --force to replace it"):
        _write_one(tmp_path, name="Other")
    with pytest.raises(UserError, match="pass --overwrite to replace it"):
        _write_one(tmp_path, name="Other", force_flag="--overwrite")
    with pytest.raises(UserError, match="one of the sources"):  # never replaced, not even with force
        _write_one(tmp_path, force=True, protected=[target])
    replaced = _write_one(tmp_path, name="Other", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset007_Other"] and replaced.is_dir()
    for bad_id, bad_name in ((0, "Toy"), (1000, "Toy"), (8, "has space"), (8, "dot.name")):
        with pytest.raises(UserError):
            _write_one(tmp_path, bad_id, bad_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset007_Other"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        _write_one(tmp_path / "file")


def test_writer_copies_links_and_refuses_two_files_of_one_name(tmp_path):
    from nnunet_ext.core.datasets import RawDatasetWriter
    from nnunet_ext.core.errors import UserError

    src = tmp_path / "src.nii.gz"
    src.write_bytes(b"image bytes")
    root = tmp_path / "raw"
    with RawDatasetWriter(root, 9, "Links", False) as writer:
        copied = writer.add_file(src, "imagesTr", "c_0000.nii.gz", "copy")
        linked = writer.add_file(src, "imagesTr", "h_0000.nii.gz", "hardlink")
        sym = writer.add_file(src, "imagesTr", "s_0000.nii.gz", "symlink")
        with pytest.raises(UserError, match="same output file imagesTr/c_0000.nii.gz"):
            writer.add_file(src, "imagesTr", "c_0000.nii.gz")
        assert os.stat(linked).st_ino == os.stat(src).st_ino and os.stat(copied).st_ino != os.stat(src).st_ino
        assert os.path.islink(sym) and os.readlink(sym) == str(src.resolve())
        target = writer.finish({})
    images = target / "imagesTr"
    assert sorted(p.name for p in images.iterdir()) == ["c_0000.nii.gz", "h_0000.nii.gz", "s_0000.nii.gz"]
    assert all(
        (images / n).read_bytes() == b"image bytes"
        for n in ("c_0000.nii.gz", "h_0000.nii.gz", "s_0000.nii.gz")
    )
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_every_raw_dataset_is_written_by_the_one_writer():
    """No module but core/datasets.py swaps a dataset into place or builds one in its own temp folder."""

    package = REPO / "nnunet_ext"
    for f in sorted(package.rglob("*.py")):
        if f.name == "datasets.py" and f.parent.name == "core":
            continue
        text = f.read_text(encoding="utf-8")
        assert "replace_dataset(" not in text, f
        assert "class _DatasetWriter" not in text and "class RawDatasetWriter" not in text, f
