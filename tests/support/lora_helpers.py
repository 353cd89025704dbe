"""Test helpers (moved from tests/core/test_lora.py): _setenv, arch_kwargs, foundation_checkpoint, make_net, make_trainer."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn


def arch_kwargs(style: str, dim: int = 3, features=(4, 8, 16)) -> dict:
    n = len(features)
    kw = dict(
        n_stages=n,
        features_per_stage=list(features),
        conv_op=nn.Conv3d if dim == 3 else nn.Conv2d,
        kernel_sizes=[[3] * dim] * n,
        strides=[[1] * dim] + [[2] * dim] * (n - 1),
        n_conv_per_stage_decoder=[1] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    kw["n_conv_per_stage" if style == "plain" else "n_blocks_per_stage"] = [1] * n
    return kw


def make_net(style: str, dim: int = 3, seed: int = 0, features=(4, 8, 16)) -> nn.Module:
    torch.manual_seed(seed)
    cls = PlainConvUNet if style == "plain" else ResidualEncoderUNet
    net = cls(input_channels=1, num_classes=3, deep_supervision=True, **arch_kwargs(style, dim, features))
    net.apply(net.initialize)
    # a "pretrained" network: ResidualEncoderUNet zero-initialises the last norm of each residual block,
    # which would block every gradient into that block; trained weights are not zero
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.InstanceNorm3d, nn.InstanceNorm2d)):
                m.weight.uniform_(0.5, 1.5)
    return net


def _setenv(monkeypatch, workspace):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, workspace.env[k])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "f")


def make_trainer(name: str, dataset: str, fold: int = 0):
    from nnunet_ext.medseqft.run import _trainer

    return _trainer(name, dataset, "3d_tiny", fold, "nnUNetPlans", torch.device("cpu"))


def foundation_checkpoint(workspace) -> tuple[str, str]:
    """A plain nnU-Net checkpoint to fine-tune from: nnUNetTrainer_smoke (1 iteration) on the full phantom
    501; trained once per session (cached in the session workspace, shared with test_medseqft)."""
    dataset = workspace.dataset(501).name
    root = workspace.root / "foundation"
    ckpt = root / dataset / "nnUNetTrainer_smoke__nnUNetPlans__3d_tiny" / "fold_0" / "checkpoint_final.pth"
    if not ckpt.is_file():
        mp = pytest.MonkeyPatch()
        _setenv(mp, workspace)
        mp.setenv("nnUNet_results", str(root))
        trainer = make_trainer("nnUNetTrainer_smoke", dataset)
        trainer.num_iterations_per_epoch = 1
        trainer.run_training()
        mp.undo()
    return dataset, str(ckpt)
