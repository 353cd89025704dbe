"""preprocess_with_plans_of: one dataset preprocessed with another's plans (the label-propagation recipe's later
rounds and the MedSeqFT convergence benchmark's tasks share it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.nnunet_commands import preprocess_with_plans_of


def _folders(tmp_path: Path) -> dict:
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    dataset = tmp_path / "raw" / "Dataset012_Target"
    dataset.mkdir(parents=True)
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "numTraining": 3}))
    return env


def test_commands_in_order_and_dataset_json_before_preprocessing(tmp_path):
    env = _folders(tmp_path)
    target = tmp_path / "pre" / "Dataset012_Target" / "dataset.json"
    ran = []

    def run(cmd):
        # nnUNetv2_preprocess must find the dataset.json the planner would have copied
        ran.append(([Path(cmd[0]).name, *cmd[1:]], target.is_file()))

    preprocess_with_plans_of(7, 12, env, run, plans="P", configuration="3d_lowres", num_processes=3)
    assert ran == [
        (["nnUNetv2_extract_fingerprint", "-d", "12", "-np", "3"], False),
        (["nnUNetv2_move_plans_between_datasets", "-s", "7", "-t", "12", "-sp", "P", "-tp", "P"], False),
        (["nnUNetv2_preprocess", "-d", "12", "-plans_name", "P", "-c", "3d_lowres", "-np", "3"], True),
    ]
    assert json.loads(target.read_text())["numTraining"] == 3


def test_missing_or_broken_dataset_is_named(tmp_path):
    env = _folders(tmp_path)
    with pytest.raises(UserError, match="no Dataset013_\\* in nnUNet_raw=.*write the dataset first"):
        preprocess_with_plans_of(7, 13, env, lambda cmd: None)
    (tmp_path / "raw" / "Dataset012_Target" / "dataset.json").write_text("{")
    with pytest.raises(UserError, match="dataset.json .* rerun it"):
        preprocess_with_plans_of(7, 12, env, lambda cmd: None, fix="rerun it")
