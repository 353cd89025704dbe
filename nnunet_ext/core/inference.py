"""The one way our commands pick a torch device and build nnU-Net's predictor.

* :func:`torch_device`: every ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) as a torch
  device; ``auto`` is CUDA when this machine has it, else the CPU; a device this machine lacks is a one-line
  :class:`UserError` that names the fix. (argparse checks the spelling first, without torch:
  :func:`nnunet_ext.core.nnunet_commands.device_arg`.)
* :func:`make_predictor`: ``nnUNetPredictor`` with nnU-Net's defaults (Gaussian weighting, step 0.5, mirroring
  unless switched off) and everything on the device only on CUDA, as ``nnUNetv2_predict`` does.
* :func:`predictor_from_model_folder` (a trained model folder, as ``nnUNetv2_predict``) and
  :func:`predictor_for_network` (a network in memory: a trainer's validation, a benchmark, a composed
  checkpoint).

torch and nnU-Net are imported inside the functions, so ``--help`` never loads them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nnunet_ext.core.errors import UserError


def torch_device(device):
    """``device`` (a string or a torch device) as a torch device; see the module docstring."""
    import torch

    if isinstance(device, torch.device):
        return device
    device = str(device).strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"invalid --device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps requested but MPS is not available here; use --device cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


def make_predictor(device, tta: bool = True, step: float = 0.5, progress: bool = False):
    """An uninitialised ``nnUNetPredictor`` on ``device`` (see the module docstring)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    dev = torch_device(device)
    return nnUNetPredictor(
        tile_step_size=step,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=dev.type == "cuda",
        device=dev,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=progress,
    )


def predictor_from_model_folder(
    model_folder,
    folds: Sequence,
    checkpoint: str = "checkpoint_final.pth",
    device="auto",
    tta: bool = True,
    step: float = 0.5,
    progress: bool = False,
):
    """nnU-Net's predictor for a trained model folder (``-d -c -tr -p`` resolved), our trainers findable by
    name. ``folds``: ints or ``'all'``."""
    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    if not (Path(model_folder) / "plans.json").is_file():
        raise UserError(f"{model_folder} is not a trained model folder (no plans.json); check -d/-c/-tr/-p.")
    os.environ["nnUNet_extTrainer"] = ext_trainer_env()["nnUNet_extTrainer"]
    predictor = make_predictor(device, tta=tta, step=step, progress=progress)
    folds = tuple(f if f == "all" else int(f) for f in folds)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint)
    return predictor


def predictor_for_network(
    network,
    plans_manager,
    configuration_manager,
    dataset_json: dict,
    trainer_name: str,
    mirror_axes,
    device,
    parameters: list | None = None,
    tta: bool = True,
    step: float = 0.5,
):
    """nnU-Net's predictor around a network in memory (``manual_initialization``); ``parameters``: state dicts
    to load per fold, None to use the network as it is."""
    predictor = make_predictor(device, tta=tta, step=step)
    predictor.manual_initialization(
        network, plans_manager, configuration_manager, parameters, dataset_json, trainer_name, mirror_axes
    )
    return predictor


def predictor_for_trainer(trainer, tta: bool = True):
    """nnU-Net's predictor around a trainer's own network (deep supervision off, eval mode), as
    ``nnUNetTrainer.perform_actual_validation`` builds it."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    return predictor_for_network(
        trainer.network,
        trainer.plans_manager,
        trainer.configuration_manager,
        trainer.dataset_json,
        trainer.__class__.__name__,
        trainer.inference_allowed_mirroring_axes,
        trainer.device,
        tta=tta,
    )
