"""The shared end of our trainers' train_step (nnunet_ext.core.nnunet_commands.backward_and_step): gradient clipping is one
class attribute, ``grad_clip``, nnU-Net's 12 unless a trainer sets another (TransDoDNet: 0.1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nnunet_ext.core.nnunet_commands import GRAD_CLIP, backward_and_step


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
