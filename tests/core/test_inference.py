"""core.inference (the one device resolver and predictor builder), core.progress and core.paths.dataset_name."""

from __future__ import annotations

import io

import pytest
import torch

from nnunet_ext.core import inference
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.paths import dataset_name, resolve_dataset_folder
from nnunet_ext.core.progress import progress


def test_auto_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference.torch_device("auto") == torch.device("cpu")
    assert inference.torch_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference.torch_device("auto") == torch.device("cuda")
    dev = torch.device("cpu")
    assert inference.torch_device(dev) is dev


@pytest.mark.parametrize(
    "value,cuda,count,message",
    [
        ("gpu0", False, 0, "invalid --device 'gpu0': use cpu, cuda, cuda:N, mps or auto"),
        ("cuda", False, 0, "--device cuda requested but no CUDA GPU is available; use --device cpu"),
        ("cuda:3", True, 2, "--device cuda:3: this machine has 2 CUDA GPU(s); use cuda:0 to cuda:1"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_with_the_fix(monkeypatch, value, cuda, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UserError) as e:
        inference.torch_device(value)
    assert str(e.value) == message


def test_the_predictor_has_nnunets_defaults():
    p = inference.make_predictor("cpu", tta=False, step=0.25)
    assert (p.tile_step_size, p.use_gaussian, p.use_mirroring) == (0.25, True, False)
    assert p.device == torch.device("cpu") and p.perform_everything_on_device is False
    assert (p.verbose, p.allow_tqdm) == (False, False)
    assert inference.make_predictor("cpu").use_mirroring is True


def test_a_model_folder_without_plans_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a trained model folder"):
        inference.predictor_from_model_folder(tmp_path, [0], device="cpu")


def test_progress_is_off_on_request_and_on_stderr(monkeypatch):
    items = [1, 2, 3]
    assert progress(items, "x", enabled=False) is items
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert list(progress(items, "cases here")) == items
    assert "cases here" in err.getvalue() and "3/3" in err.getvalue()


def test_dataset_names_and_folders_resolve_as_nnunet_does(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    (raw / "Dataset004_Phantom").mkdir(parents=True)
    (raw / "Dataset004_Phantom" / "dataset.json").write_text("{}")
    pre.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.delenv("nnUNet_results", raising=False)  # nnU-Net's paths read the env vars when asked
    assert dataset_name(4) == dataset_name("004") == "Dataset004_Phantom"
    with pytest.raises(UserError, match="dataset 9 not found .* run nnUNetv2_plan_and_preprocess -d 9 first"):
        dataset_name(9)
    assert resolve_dataset_folder("4") == raw / "Dataset004_Phantom"
    assert resolve_dataset_folder(raw / "Dataset004_Phantom") == raw / "Dataset004_Phantom"
    with pytest.raises(UserError, match="not found under nnUNet_preprocessed"):
        resolve_dataset_folder("4", roots=("nnUNet_preprocessed",))
