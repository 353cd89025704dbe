"""`nnunet-ext doctor` and dataset resolution: missing or wrong env vars are named with their fix."""

from __future__ import annotations

import pytest
from support.paths import REPO

import nnunet_ext
from nnunet_ext.cli import main
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.paths import resolve_dataset


def test_doctor_all_good(nnunet_folders, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", nnunet_ext.trainer_dir())
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "all good" in out and "trainers found by nnU-Net" in out


def test_doctor_missing_ext_trainer(nnunet_folders, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "nnUNet_extTrainer" in out and "export nnUNet_extTrainer=$(nnunet-ext trainer-dir)" in out


def test_doctor_flags_the_package_folder(nnunet_folders, monkeypatch, capsys):
    """Pointing nnUNet_extTrainer at the trainers package would give nnU-Net a second class object."""
    monkeypatch.setenv("nnUNet_extTrainer", str(REPO / "trainers"))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "SECOND copy" in out or "different class object" in out


def test_doctor_missing_nnunet_folders(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", nnunet_ext.trainer_dir())
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "export nnUNet_raw=" in out and "mkdir -p" in out


def test_resolve_dataset_by_id_and_name(nnunet_folders):
    folder = nnunet_folders / "nnUNet_preprocessed" / "Dataset007_Thing"
    folder.mkdir()
    assert resolve_dataset("7") == folder
    assert resolve_dataset("007") == folder
    assert resolve_dataset("Dataset007_Thing") == folder
    with pytest.raises(UserError, match="not found.*Dataset007_Thing"):
        resolve_dataset("8")
    (nnunet_folders / "nnUNet_preprocessed" / "Dataset007_Other").mkdir()
    with pytest.raises(UserError, match="ambiguous"):
        resolve_dataset("7")
