"""Test helpers (moved from tests/conftest.py): BIN, nnunet_env, run, training_env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nnunet_ext

BIN = Path(sys.executable).parent


def nnunet_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_extTrainer=nnunet_ext.trainer_dir(),
        nnUNet_compile="f",
        nnUNet_def_n_proc="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    return env


def training_env(env: dict) -> dict:
    """Single-process data augmentation for CPU training runs (planning needs nnUNet_n_proc_DA unset or > 0)."""
    return {**env, "nnUNet_n_proc_DA": "0"}


def run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console script of this environment; fail the test with its output if it fails."""
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run(
        [exe, *cmd[1:]],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc
