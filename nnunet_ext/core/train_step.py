"""The train-step plumbing every trainer of ours shares, so that each trainer writes only its loss.

nnU-Net's ``train_step`` is: batch to the device, ``zero_grad``, forward and loss under autocast (CUDA only),
backward through the AMP grad scaler when there is one, gradient clipping, optimizer step. Our trainers
compute their own losses (boundaries, partial labels, task prompts, distillation), so they cannot call
nnU-Net's; they call :func:`optimizer_step` with a function that returns the loss, and nothing else of the
sequence is written twice. :func:`batch_to_device` and :func:`autocast_for` serve their validation steps.
:func:`deep_supervision` wraps a loss of ours as nnU-Net's ``_build_loss`` wraps its own, in nnU-Net's
``DeepSupervisionWrapper``; :func:`call_with_tasks` calls such a loss with the (B,) task ids of the batch.
:func:`unwrap` is the one way to reach the network behind DDP and torch.compile.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.helpers import dummy_context
from torch import nn

#: nnU-Net's gradient clipping norm (``clip_grad_norm_(..., 12)`` in nnUNetTrainer.train_step)
GRAD_CLIP = 12.0


def batch_to_device(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """``batch['data']`` and ``batch['target']`` (one tensor, or one per deep-supervision scale) on the trainer's
    device, as nnU-Net moves them."""
    data = batch["data"].to(trainer.device, non_blocking=True)
    target = batch["target"]
    if isinstance(target, list):
        target = [t.to(trainer.device, non_blocking=True) for t in target]
    else:
        target = target.to(trainer.device, non_blocking=True)
    return data, target


def autocast_for(trainer):
    """Mixed precision on CUDA only, as nnU-Net does (CPU and MPS run in float32)."""
    if trainer.device.type == "cuda":
        return torch.autocast(trainer.device.type, enabled=True)
    return dummy_context()


def backward_and_step(trainer, loss: torch.Tensor) -> None:
    """The end of nnU-Net's ``train_step``: backward (through the AMP grad scaler when there is one), gradient
    clipping to the trainer's ``grad_clip`` (nnU-Net's 12 unless the class sets another), optimizer step."""
    max_norm = getattr(trainer, "grad_clip", GRAD_CLIP)
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), max_norm)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), max_norm)
        trainer.optimizer.step()


def optimizer_step(trainer, compute_loss: Callable[[], torch.Tensor]) -> dict:
    """One optimisation step: ``zero_grad``, ``compute_loss()`` (forward and loss) under :func:`autocast_for`,
    then :func:`backward_and_step`; returns nnU-Net's ``{'loss': ...}``."""
    trainer.optimizer.zero_grad(set_to_none=True)
    with autocast_for(trainer):
        loss = compute_loss()
    backward_and_step(trainer, loss)
    return {"loss": loss.detach().cpu().numpy()}


def deep_supervision_weights(trainer) -> np.ndarray:
    """nnU-Net's deep-supervision weights (``nnUNetTrainer._build_loss``): 1/2**i per scale, the lowest
    resolution 0 (a tiny 1e-6 under DDP without compile, so that no parameter goes unused), normalised to sum 1."""
    scales = trainer._get_deep_supervision_scales()
    weights = np.array([1 / (2**i) for i in range(len(scales))])
    weights[-1] = 1e-6 if (trainer.is_ddp and not trainer._do_i_compile()) else 0
    return weights / weights.sum()


def deep_supervision(trainer, loss: torch.nn.Module) -> torch.nn.Module:
    """``loss`` as nnU-Net's ``_build_loss`` returns its own: wrapped in nnU-Net's ``DeepSupervisionWrapper``
    with :func:`deep_supervision_weights` when the trainer has deep supervision on, else unchanged."""
    if not trainer.enable_deep_supervision:
        return loss
    return DeepSupervisionWrapper(loss, deep_supervision_weights(trainer))


def per_scale_loss(loss: torch.nn.Module) -> torch.nn.Module:
    """The loss of one resolution: the module :func:`deep_supervision` wrapped (or ``loss`` itself)."""
    return loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss


def call_with_tasks(loss: torch.nn.Module, output, target, task_ids: torch.Tensor) -> torch.Tensor:
    """``loss(output, target, task_ids)`` for a loss built by :func:`deep_supervision`: nnU-Net's wrapper zips
    list arguments scale by scale, so every scale gets the same (B,) task ids."""
    if isinstance(loss, DeepSupervisionWrapper):
        return loss(output, target, [task_ids] * len(output))
    return loss(output, target, task_ids)


def unwrap(net: nn.Module) -> nn.Module:
    """The plain network inside DDP / torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    while isinstance(net, (DDP, OptimizedModule)):
        net = net.module if isinstance(net, DDP) else net._orig_mod
    return net


def uncompiled(module: nn.Module) -> nn.Module:
    """``module`` with every ``torch.compile``'d submodule, at any depth, replaced by its original (nnU-Net
    compiles the Dice term INSIDE its loss): a shallow copy sharing parameters and buffers; ``module`` itself is
    left compiled. For extra passes that a compiled graph does not allow (a second backward with
    ``retain_graph``)."""
    from torch._dynamo import OptimizedModule

    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    clone = copy.copy(module)
    clone._modules = {name: None if c is None else uncompiled(c) for name, c in module._modules.items()}
    return clone
