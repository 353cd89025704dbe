"""File helpers: atomic writes keep permissions as a user expects (not tempfile's 0600 / 0700)."""

from __future__ import annotations

import os
import stat

import pytest

from nnunet_ext.io import atomic_write_json, atomic_write_text, make_temp_dir, replace_dataset


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
