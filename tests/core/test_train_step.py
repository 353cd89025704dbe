"""The shared end of our trainers' train_step (nnunet_ext.core.train_step): gradient clipping is one
class attribute, ``grad_clip``, nnU-Net's 12 unless a trainer sets another (TransDoDNet: 0.1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nnunet_ext.core.train_step import GRAD_CLIP, backward_and_step, batch_to_device, optimizer_step


def step(grad_clip=None) -> float:
    """The gradient norm backward_and_step leaves on a parameter whose raw gradient norm is 1000."""
    weight = torch.nn.Parameter(torch.zeros(4))
    trainer = SimpleNamespace(
        network=torch.nn.ParameterList([weight]),
        optimizer=torch.optim.SGD([weight], lr=0.0),
        grad_scaler=None,
    )
    if grad_clip is not None:
        trainer.grad_clip = grad_clip
    backward_and_step(trainer, (weight * torch.full((4,), 500.0)).sum())
    return float(weight.grad.norm())


def test_clipping_defaults_to_nnunets_value():
    assert GRAD_CLIP == 12.0
    assert step() == pytest.approx(12.0, rel=1e-5)


def test_a_trainer_sets_its_clip_as_a_class_attribute():
    from nnunet_ext.trainers import nnUNetTrainerBANet, nnUNetTrainerDoDNet, nnUNetTrainerTransDoDNet

    assert step(0.1) == pytest.approx(0.1, rel=1e-5)
    assert nnUNetTrainerTransDoDNet.grad_clip == 0.1
    assert not hasattr(nnUNetTrainerDoDNet, "grad_clip") and not hasattr(nnUNetTrainerBANet, "grad_clip")


def test_optimizer_step_is_nnunets_sequence():
    """zero_grad (stale gradients do not leak in), the loss, the clipped step, nnU-Net's {'loss': array}."""
    weight = torch.nn.Parameter(torch.ones(3))
    trainer = SimpleNamespace(
        network=torch.nn.ParameterList([weight]),
        optimizer=torch.optim.SGD([weight], lr=1.0),
        grad_scaler=None,
        device=torch.device("cpu"),
    )
    weight.grad = torch.full((3,), 1e6)  # left over from elsewhere: zero_grad must drop it
    batch = {"data": torch.ones(3), "target": [torch.zeros(3), torch.zeros(2)]}
    data, target = batch_to_device(trainer, batch)
    assert isinstance(target, list) and data.device.type == "cpu"
    out = optimizer_step(trainer, lambda: (weight * data).sum())
    assert set(out) == {"loss"} and float(out["loss"]) == pytest.approx(3.0)
    assert torch.allclose(weight.detach(), torch.zeros(3))  # one SGD step of lr 1 on gradient 1 (norm < 12)
