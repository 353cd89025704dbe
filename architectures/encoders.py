"""Shared network building blocks: the encoders nnU-Net's plans describe, built exactly as nnU-Net does.

Every method network (BA-Net, DoDNet, TransDoDNet, ...) takes the plans' architecture kwargs of
``PlainConvUNet`` (``n_conv_per_stage``) or ``ResidualEncoderUNet`` (``n_blocks_per_stage``) and builds its
encoder here, so the encoder's parameter names equal the stock networks' (``-pretrained_weights`` from a plain
nnU-Net checkpoint works).
"""

from __future__ import annotations

from typing import Union

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn
from torch.nn.modules.conv import _ConvNd

IntOrSeq = Union[int, list, tuple]


def build_nnunet_encoder(
    input_channels: int,
    n_stages: int,
    features_per_stage: IntOrSeq,
    conv_op: type[_ConvNd],
    kernel_sizes: IntOrSeq,
    strides: IntOrSeq,
    n_conv_per_stage: IntOrSeq | None,
    n_blocks_per_stage: IntOrSeq | None,
    nonlin_first: bool,
    block,
    bottleneck_channels,
    stem_channels,
    **common,
) -> tuple[nn.Module, str, str, tuple[str, ...]]:
    """The encoder PlainConvUNet (``n_conv_per_stage``) or ResidualEncoderUNet (``n_blocks_per_stage``) builds,
    with ``return_skips=True``; also returns (key_to_encoder, key_to_stem, keys_to_in_proj)."""
    if (n_conv_per_stage is None) == (n_blocks_per_stage is None):
        raise ValueError(
            "needs exactly one of n_conv_per_stage (PlainConvUNet plans) or n_blocks_per_stage "
            "(ResidualEncoderUNet plans) in the architecture kwargs."
        )
    if n_conv_per_stage is not None:
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * n_stages
        if len(n_conv_per_stage) != n_stages:
            raise ValueError(f"n_conv_per_stage needs n_stages = {n_stages} entries, got {n_conv_per_stage}.")
        enc = PlainConvEncoder(
            input_channels,
            n_stages,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            n_conv_per_stage,
            nonlin_first=nonlin_first,
            return_skips=True,
            **common,
        )
        return (
            enc,
            "encoder.stages",
            "encoder.stages.0",
            ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv"),
        )
    if nonlin_first:
        raise ValueError("nonlin_first is only supported with n_conv_per_stage (PlainConvUNet plans).")
    if isinstance(n_blocks_per_stage, int):
        n_blocks_per_stage = [n_blocks_per_stage] * n_stages
    if len(n_blocks_per_stage) != n_stages:
        raise ValueError(f"n_blocks_per_stage needs n_stages = {n_stages} entries, got {n_blocks_per_stage}.")
    enc = ResidualEncoder(
        input_channels,
        n_stages,
        features_per_stage,
        conv_op,
        kernel_sizes,
        strides,
        n_blocks_per_stage,
        block=block,
        bottleneck_channels=bottleneck_channels,
        disable_default_stem=False,
        stem_channels=stem_channels,
        return_skips=True,
        **common,
    )
    return (
        enc,
        "encoder.stages",
        "encoder.stem",
        ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"),
    )
