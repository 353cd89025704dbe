"""Shared fixtures. Everything runs on CPU with tiny phantoms and the tiny configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nnunet_ext

BIN = Path(sys.executable).parent

# never compile on CPU in tests (nnU-Net would only try on CUDA anyway)
os.environ.setdefault("nnUNet_compile", "f")


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


class PhantomWorkspace:
    """nnU-Net folders in a temp dir; phantom datasets planned + preprocessed with the stock CLI on demand."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("raw", "preprocessed", "results"):
            (root / sub).mkdir(exist_ok=True)
        self.env = nnunet_env(root)
        self._ready: set[int] = set()

    def dataset(self, dataset_id: int = 501, kind: str = "full") -> Path:
        """Raw folder of phantom ``dataset_id`` (tiny: 24x48x48, one tile of 3d_tiny), preprocessed + 3d_tiny."""
        from nnunet_ext.tools.phantoms import write_phantom_dataset

        if dataset_id not in self._ready:
            write_phantom_dataset(
                self.root / "raw",
                dataset_id,
                kind=kind,
                num_train=6,
                num_test=2,
                shape=(24, 48, 48),
                seed=dataset_id,
            )
            run(
                [
                    "nnUNetv2_plan_and_preprocess",
                    "-d",
                    str(dataset_id),
                    "-c",
                    "3d_fullres",
                    "-np",
                    "1",
                    "--verify_dataset_integrity",
                ],
                self.env,
            )
            run(["nnunet-ext", "plans", "tiny", str(dataset_id)], self.env)
            self._ready.add(dataset_id)
        return next((self.root / "raw").glob(f"Dataset{dataset_id:03d}_*"))


@pytest.fixture(scope="session")
def phantom_workspace(tmp_path_factory) -> PhantomWorkspace:
    return PhantomWorkspace(tmp_path_factory.mktemp("nnunet"))
