"""Shared fixtures. Everything runs on CPU with tiny phantoms and the tiny configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nnunet_ext

BIN = Path(sys.executable).parent

# keep nnU-Net single-process and quiet in tests, and never compile on CPU
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_def_n_proc", "1")


def nnunet_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_extTrainer=nnunet_ext.trainer_dir(),
        nnUNet_n_proc_DA="0",
        nnUNet_compile="f",
        nnUNet_def_n_proc="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    return env


def run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console script of this environment; fail the test with its output if it fails."""
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def phantom_workspace(tmp_path_factory) -> tuple[Path, dict]:
    """A full phantom dataset (id 501), planned and preprocessed with the stock CLI, plus 3d_tiny."""
    from nnunet_ext.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("nnunet")
    for sub in ("raw", "preprocessed", "results"):
        (root / sub).mkdir()
    env = nnunet_env(root)
    write_phantom_dataset(root / "raw", 501, kind="full", num_train=6, num_test=2, seed=0)
    run(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"],
        env)
    run(["nnunet-ext", "plans", "tiny", "501"], env)
    return root, env
