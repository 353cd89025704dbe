"""Network classes of nnunet_ext (installed as ``nnunet_ext.architectures``).

Plans reference a network by dotted path (``network_class_name``); nnU-Net resolves it with
``pydoc.locate`` and calls ``cls(input_channels=..., num_classes=..., deep_supervision=..., **arch_kwargs)``.

``ARCHITECTURES`` is the registry ``nnunet-ext plans add --arch NAME`` uses to swap a network into a
configuration. ``kwargs`` says which encoder keyword a class takes:

* ``"plain"``: ``n_conv_per_stage`` (PlainConvUNet-style encoder);
* ``"resenc"``: ``n_blocks_per_stage`` (ResidualEncoderUNet-style encoder);
* ``"any"``: either; the parent configuration's keyword is kept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    network_class_name: str
    kwargs: str  # "plain" | "resenc" | "any"
    description: str


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in [
        ArchitectureSpec(
            "PlainConvUNet",
            "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "plain",
            "nnU-Net's default U-Net (stock)",
        ),
        ArchitectureSpec(
            "ResidualEncoderUNet",
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "resenc",
            "nnU-Net's residual-encoder U-Net (stock, as in the ResEnc presets)",
        ),
        ArchitectureSpec(
            "BANet",
            "nnunet_ext.architectures.banet.BANet",
            "any",
            "BA-Net: encoder + segmentation and boundary decoders (train with nnUNetTrainerBANet)",
        ),
    ]
}
