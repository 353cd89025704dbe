"""Test helpers (moved from tests/test_bad_input_commands.py): DATA, _fake_preprocessed, _medseqft_env."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def _fake_preprocessed(root: Path, dataset_id: int = 611) -> Path:
    """nnUNet_preprocessed/DatasetXXX_Tiny with real plans and two (empty) case files: enough for `medseqft
    select` to get as far as the checkpoint (-f all: no split needed)."""
    base = root / f"Dataset{dataset_id:03d}_Tiny"
    plans = json.loads((DATA / "nnUNetPlans.json").read_text())
    plans["dataset_name"] = base.name
    (base / plans["configurations"]["3d_fullres"]["data_identifier"]).mkdir(parents=True)
    (base / "nnUNetPlans.json").write_text(json.dumps(plans))
    shutil.copy(DATA / "dataset.json", base / "dataset.json")
    for case in ("case_a", "case_b"):
        (base / plans["configurations"]["3d_fullres"]["data_identifier"] / f"{case}.npz").write_bytes(b"")
    return base


def _medseqft_env(tmp_path, monkeypatch) -> Path:
    pre = tmp_path / "preprocessed"
    for key, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "res"),
    ):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(key, str(tmp_path / sub))
    return _fake_preprocessed(pre)
