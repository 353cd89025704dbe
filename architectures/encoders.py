"""Shared network building blocks: the encoders nnU-Net's plans describe, built exactly as nnU-Net does.

Every method network (BA-Net, DoDNet, TransDoDNet, ...) takes the plans' architecture kwargs of
``PlainConvUNet`` (``n_conv_per_stage``) or ``ResidualEncoderUNet`` (``n_blocks_per_stage``) and builds its
encoder here, so the encoder's parameter names equal the stock networks' (``-pretrained_weights`` from a plain
nnU-Net checkpoint works).
"""

from __future__ import annotations

from typing import Union

from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import (
    InitWeights_He,
    init_last_bn_before_add_to_0,
)
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

#: an int for every stage, or one value per stage (nnU-Net's plans use both)
IntOrSeq = Union[int, list, tuple]


def build_nnunet_encoder(
    input_channels: int,
    n_stages: int,
    features_per_stage: IntOrSeq,
    conv_op: type[_ConvNd],
    kernel_sizes: IntOrSeq,
    strides: IntOrSeq,
    n_conv_per_stage: IntOrSeq | None = None,
    n_blocks_per_stage: IntOrSeq | None = None,
    nonlin_first: bool = False,
    block: type[BasicBlockD] | type[BottleneckD] = BasicBlockD,
    bottleneck_channels: IntOrSeq | None = None,
    stem_channels: int | None = None,
    conv_bias: bool = False,
    norm_op: type[nn.Module] | None = None,
    norm_op_kwargs: dict | None = None,
    dropout_op: type[_DropoutNd] | None = None,
    dropout_op_kwargs: dict | None = None,
    nonlin: type[nn.Module] | None = None,
    nonlin_kwargs: dict | None = None,
) -> tuple[nn.Module, str, str, tuple[str, ...]]:
    """The encoder PlainConvUNet (``n_conv_per_stage``) or ResidualEncoderUNet (``n_blocks_per_stage``) builds,
    with ``return_skips=True``; also returns (key_to_encoder, key_to_stem, keys_to_in_proj)."""
    common = dict(
        conv_bias=conv_bias,
        norm_op=norm_op,
        norm_op_kwargs=norm_op_kwargs,
        dropout_op=dropout_op,
        dropout_op_kwargs=dropout_op_kwargs,
        nonlin=nonlin,
        nonlin_kwargs=nonlin_kwargs,
    )
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


def decoder_conv_counts(n_conv_per_stage_decoder: IntOrSeq, n_stages: int) -> list[int]:
    """``n_conv_per_stage_decoder`` as one entry per decoder stage (``n_stages - 1``), checked."""
    if isinstance(n_conv_per_stage_decoder, int):
        n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
    if len(n_conv_per_stage_decoder) != n_stages - 1:
        raise ValueError(
            f"n_conv_per_stage_decoder needs n_stages - 1 = {n_stages - 1} entries, got {n_conv_per_stage_decoder}."
        )
    return list(n_conv_per_stage_decoder)


class NNUNetEncoderNetwork(AbstractDynamicNetworkArchitectures):
    """Base of the method networks built on the encoder of nnU-Net's plans (BA-Net, DoDNet, UniSeg, ...).

    A subclass's ``__init__`` takes the backbone's own arguments (``input_channels, n_stages,
    features_per_stage, conv_op, kernel_sizes, strides, num_classes, n_conv_per_stage_decoder,
    deep_supervision, nonlin_first``), its method's arguments, and ``**encoder_kwargs``: the remaining
    architecture kwargs of the plans, which go unchanged to :func:`build_nnunet_encoder` (``n_conv_per_stage``
    or ``n_blocks_per_stage``, ``conv_bias``, ``norm_op[_kwargs]``, ``dropout_op[_kwargs]``,
    ``nonlin[_kwargs]``, ``block``, ``bottleneck_channels``, ``stem_channels``); an unknown one is a TypeError.
    """

    def _build_encoder(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: IntOrSeq,
        conv_op: type[_ConvNd],
        kernel_sizes: IntOrSeq,
        strides: IntOrSeq,
        n_conv_per_stage_decoder: IntOrSeq,
        nonlin_first: bool,
        encoder_kwargs: dict,
    ) -> list[int]:
        """Sets ``self.encoder`` and nnU-Net's key attributes; returns the decoder's conv counts per stage."""
        decoder_convs = decoder_conv_counts(n_conv_per_stage_decoder, n_stages)
        self.encoder, self.key_to_encoder, self.key_to_stem, self.keys_to_in_proj = build_nnunet_encoder(
            input_channels,
            n_stages,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            nonlin_first=nonlin_first,
            **encoder_kwargs,
        )
        return decoder_convs

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's initialisation: He init of every conv (heads included; linear layers keep PyTorch's
        default), and residual blocks get their last norm before the addition zeroed, as ResidualEncoderUNet does
        (a no-op for plain encoders)."""
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
