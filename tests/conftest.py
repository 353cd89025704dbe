"""Shared fixtures. Everything runs on CPU with tiny phantoms and the tiny configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.commands import BIN, nnunet_env, run, training_env  # noqa: F401

# never compile on CPU in tests (nnU-Net would only try on CUDA anyway)
os.environ.setdefault("nnUNet_compile", "f")


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


@pytest.fixture
def torch_threads():
    """``torch.set_num_threads`` for one test: the thread count it found is put back afterwards."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """Empty nnUNet_raw / nnUNet_preprocessed / nnUNet_results under tmp_path, set for this test."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path
