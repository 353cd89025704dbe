"""Building a method's network from nnU-Net plans: the one place that turns a configuration's PlainConvUNet /
ResidualEncoderUNet architecture kwargs into BA-Net, DoDNet, TransDoDNet, UniSeg, ... (used by each trainer's
``build_network_architecture``, at training AND at inference, where nnU-Net's predictor calls it)."""

from __future__ import annotations

import inspect

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_ext.core.errors import UserError


def accepted_kwargs(*network_classes: type) -> set[str]:
    """Architecture kwargs the networks' ``__init__`` accept (beyond input channels and classes)."""
    from nnunet_ext.architectures.encoders import NNUNetEncoderNetwork, build_nnunet_encoder

    names: set[str] = set()
    for cls in network_classes:
        names |= set(inspect.signature(cls.__init__).parameters)
        if issubclass(cls, NNUNetEncoderNetwork):  # its **encoder_kwargs go to build_nnunet_encoder
            names |= set(inspect.signature(build_nnunet_encoder).parameters)
    return names - {"self", "args", "kwargs", "encoder_kwargs", "input_channels", "num_classes"}


def method_network_from_plans(
    trainer_name: str,
    network_class_name: str,
    network_classes: tuple[type, ...],
    configuration_manager: ConfigurationManager,
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool,
    method_kwargs: dict | None = None,
) -> nn.Module:
    """The network ``network_class_name`` built from the configuration's backbone kwargs plus ``method_kwargs``
    (these replace any value the plans hold), with nnU-Net's ``get_network_from_plans`` and initialisation.

    ``network_classes``: the class and any base whose ``__init__`` receives forwarded kwargs (their signatures
    define which plans kwargs are understood). Plans of another network family get a clear error."""
    method_kwargs = dict(method_kwargs or {})
    arch_kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in method_kwargs:
        arch_kwargs.pop(key, None)
    unsupported = sorted(set(arch_kwargs) - accepted_kwargs(*network_classes) - {"deep_supervision"})
    if unsupported or not ({"n_conv_per_stage", "n_blocks_per_stage"} & set(arch_kwargs)):
        raise UserError(
            f"{trainer_name} builds its network from PlainConvUNet / ResidualEncoderUNet architecture kwargs, but "
            f"the plans' network ({configuration_manager.network_arch_class_name}) "
            + (
                f"has kwargs it does not know: {unsupported}. "
                if unsupported
                else "has neither n_conv_per_stage nor n_blocks_per_stage. "
            )
            + "Use plans made by nnU-Net's default or ResEnc planners."
        )
    arch_kwargs.update(method_kwargs)
    return get_network_from_plans(
        network_class_name,
        arch_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=enable_deep_supervision,
    )
