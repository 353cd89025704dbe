"""BA-Net: Boundary-Aware Network (arXiv 2208.13338 for KiPA22, arXiv 2208.13774 for AMOS22).

One nnU-Net encoder and two decoders of identical structure with separate weights, both starting from the
bottleneck:

* the segmentation decoder (``decoder``): a stock :class:`UNetDecoder`, so its parameter names are those of
  ``PlainConvUNet`` / ``ResidualEncoderUNet``;
* the boundary decoder (``boundary.seg_layers``): built by the same code (its upsampling and conv stages are
  taken from a second :class:`UNetDecoder`), with a 1x1(x1) head to 2 channels, no bias, at every stage.

At every decoder stage ``u`` the segmentation decoder's upsampled features are multiplied by
``1 + softmax(boundary_logits_u)[:, 1]`` BEFORE they are concatenated with the skip; the boundary decoder's
stage ``u`` therefore runs first. Nothing is detached: the segmentation loss also trains the boundary decoder.

Outputs (no side-channel attributes, so torch.compile and DDP work):

* training mode: a tuple ``(segmentation, boundary)``; each is a list (full resolution first) when
  ``decoder.deep_supervision`` is on, else a tensor. The boundary decoder follows the same flag (nnU-Net's
  ``set_deep_supervision_enabled`` sets only ``decoder.deep_supervision``).
* eval mode: the segmentation output only (tensor, or list with deep supervision on), exactly what a stock
  nnU-Net network returns, so ``nnUNetPredictor``, ``--val`` and the trainer's ``validation_step`` run it
  unchanged.

Why the boundary decoder lives under ``boundary.seg_layers``: nnU-Net's ``-pretrained_weights``
(``nnunetv2.run.load_pretrained_weights``) requires every key of the network to exist in the checkpoint,
EXCEPT keys containing ``.seg_layers.`` (output-specific layers, which it never transfers). Every boundary
parameter key (``boundary.seg_layers.stages...``, ``...transpconvs...``, ``...heads...``) contains that marker,
while the encoder and segmentation decoder keys are identical to those of the plain nnU-Net network. A plain
nnU-Net checkpoint of the same plans therefore loads through the stock path: encoder and segmentation decoder
are copied, the segmentation heads and the whole boundary decoder keep their initialisation (the same as
nnU-Net does for its own segmentation heads). Side effect: ``-pretrained_weights`` from a BA-Net checkpoint
does not transfer the boundary decoder either (resuming with ``--c`` and inference load everything).
"""

from __future__ import annotations

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.architectures.encoders import IntOrSeq, NNUNetEncoderNetwork


class BoundaryDecoder(nn.Module):
    """The boundary decoder: same upsampling and conv stages as the segmentation :class:`UNetDecoder` (built by
    :class:`UNetDecoder` itself from the same encoder and settings, so the structure is identical), plus one
    bias-free 1x1(x1) conv head to 2 channels (background, boundary) per stage.

    It has no forward of its own: :class:`BANet` interleaves its stages with the segmentation decoder's.
    """

    def __init__(self, template: UNetDecoder, conv_op: type[_ConvNd], stage_channels: list[int]):
        super().__init__()
        self.transpconvs = template.transpconvs
        self.stages = template.stages
        self.heads = nn.ModuleList(conv_op(c, 2, 1, 1, 0, bias=False) for c in stage_channels)


class BoundaryBranch(nn.Module):
    """Container that gives the boundary decoder the key prefix ``boundary.seg_layers.`` (see module docstring:
    nnU-Net's ``load_pretrained_weights`` neither requires nor transfers keys containing ``.seg_layers.``)."""

    def __init__(self, decoder: BoundaryDecoder):
        super().__init__()
        self.seg_layers = decoder


class ModulatedConcat(torch.autograd.Function):
    """``cat((up * (1 + gate), skip), 1)`` with a lean backward: it saves its OUTPUT (which the next conv saves as
    its input anyway: the same storage, no extra memory) and the 1-channel gate, instead of the C-channel ``up``
    that the plain ``up * (1 + gate)`` keeps alive for backward; ``up`` is recovered as
    ``output[:, :C] / (1 + gate)`` (``1 + gate >= 1``). Saves one feature map of the upsampled size per decoder
    stage (the largest extra activation BA-Net had over its second decoder) and one elementwise pass.

    ``gate`` is ``(B, 1, *spatial)`` in [0, 1] with ``up``'s dtype; torch.compile traces it (an autograd.Function
    with ``setup_context``)."""

    @staticmethod
    def forward(up: torch.Tensor, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat((up * (1 + gate), skip), 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        up, gate, _ = inputs
        ctx.channels = up.shape[1]
        ctx.save_for_backward(output, gate)

    @staticmethod
    def backward(ctx, grad):
        output, gate = ctx.saved_tensors
        c = ctx.channels
        grad_mod = grad[:, :c]
        scale = 1 + gate
        grad_up = grad_mod * scale
        # d/dgate of up * (1 + gate), summed over channels; up * (1 + gate) is output[:, :c]
        grad_gate = (grad_mod * output[:, :c]).sum(1, keepdim=True) / scale
        return grad_up, grad_gate, grad[:, c:]


def boundary_gate(boundary_logits: torch.Tensor) -> torch.Tensor:
    """``softmax(boundary_logits, 1)[:, 1:2]`` of 2-channel logits, computed as ``sigmoid(l1 - l0)`` (the same
    value; one channel, no normalisation over channels)."""
    return torch.sigmoid(boundary_logits[:, 1:2] - boundary_logits[:, 0:1])


class BANet(NNUNetEncoderNetwork):
    """BA-Net on nnU-Net's encoders; plans: ``network_class_name = "nnunet_ext.architectures.banet.BANet"``.

    Accepts the architecture kwargs of either nnU-Net network:

    * ``PlainConvUNet`` style: ``n_conv_per_stage`` (a :class:`PlainConvEncoder`), optional ``nonlin_first``;
    * ``ResidualEncoderUNet`` style: ``n_blocks_per_stage`` (a :class:`ResidualEncoder`), optional ``block``,
      ``bottleneck_channels``, ``stem_channels``.

    Exactly one of ``n_conv_per_stage`` / ``n_blocks_per_stage`` must be given. ``conv_op`` may be 2d or 3d.
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: IntOrSeq,
        conv_op: type[_ConvNd],
        kernel_sizes: IntOrSeq,
        strides: IntOrSeq,
        num_classes: int,
        n_conv_per_stage_decoder: IntOrSeq,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
        **encoder_kwargs,
    ):
        super().__init__()
        n_conv_per_stage_decoder = self._build_encoder(
            input_channels,
            n_stages,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            n_conv_per_stage_decoder,
            nonlin_first,
            encoder_kwargs,
        )
        # Segmentation decoder: exactly the decoder PlainConvUNet / ResidualEncoderUNet build (same key names).
        self.decoder = UNetDecoder(
            self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision, nonlin_first=nonlin_first
        )
        # Boundary decoder: the same construction; only its stages and upsampling are kept (no second reference
        # to the encoder, no biased 1x1 heads), and bias-free 2-channel heads are added.
        template = UNetDecoder(self.encoder, 2, n_conv_per_stage_decoder, False, nonlin_first=nonlin_first)
        stage_channels = [self.encoder.output_channels[-(s + 2)] for s in range(n_stages - 1)]
        self.boundary = BoundaryBranch(BoundaryDecoder(template, self.encoder.conv_op, stage_channels))

    @property
    def boundary_decoder(self) -> BoundaryDecoder:
        return self.boundary.seg_layers

    def forward(self, x: torch.Tensor):
        """Training mode: ``(segmentation, boundary)``; eval mode: segmentation only (what nnU-Net's
        predictor, ``--val`` and ``validation_step`` expect). Each output is a list (full resolution first)
        when deep supervision is on, else a tensor."""
        seg, bnd = self.forward_both(x)
        if self.training:
            return seg, bnd
        return seg

    def forward_both(self, x: torch.Tensor):
        """Segmentation and boundary logits in any mode (e.g. for ``nnunet-ext predict-boundaries``)."""
        skips = self.encoder(x)
        seg_dec = self.decoder
        bnd_dec = self.boundary.seg_layers
        deep_supervision = seg_dec.deep_supervision
        n = len(seg_dec.stages)
        seg_outputs = []
        bnd_outputs = []
        seg_x = skips[-1]
        bnd_x = skips[-1]
        for s in range(n):
            skip = skips[-(s + 2)]
            # boundary decoder, stage s
            bnd_x = bnd_dec.stages[s](torch.cat((bnd_dec.transpconvs[s](bnd_x), skip), 1))
            bnd_logits = bnd_dec.heads[s](bnd_x)
            # segmentation decoder, stage s: modulate the upsampled features before the skip concatenation
            up = seg_dec.transpconvs[s](seg_x)
            gate = boundary_gate(bnd_logits).to(up.dtype)  # fp32 under autocast
            seg_x = seg_dec.stages[s](ModulatedConcat.apply(up, gate, skip))
            if deep_supervision:
                seg_outputs.append(seg_dec.seg_layers[s](seg_x))
                bnd_outputs.append(bnd_logits)
            elif s == n - 1:
                seg_outputs.append(seg_dec.seg_layers[s](seg_x))
                bnd_outputs.append(bnd_logits)
        if deep_supervision:
            seg = seg_outputs[::-1]
            bnd = bnd_outputs[::-1]
        else:
            seg = seg_outputs[0]
            bnd = bnd_outputs[0]
        return seg, bnd

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Feature-map voxels of a forward pass (nnU-Net's VRAM proxy): encoder + both decoders."""
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), (
            "give the spatial image size only, e.g. input_size=(x, y, z)"
        )
        seg = self.decoder.compute_conv_feature_map_size(input_size)
        # the boundary decoder has the segmentation decoder's stages and upsampling; its heads (2 channels) and
        # the modulation map run at every stage, whatever the deep-supervision setting
        skip_sizes = []
        size = list(input_size)
        for s in range(len(self.encoder.strides) - 1):
            size = [i // j for i, j in zip(size, self.encoder.strides[s])]
            skip_sizes.append(size)
        bnd = np.int64(0)
        for s in range(len(self.decoder.stages)):
            sz = skip_sizes[-(s + 1)]
            bnd += self.boundary_decoder.stages[s].compute_conv_feature_map_size(sz)
            bnd += np.prod([self.encoder.output_channels[-(s + 2)], *sz], dtype=np.int64)
            bnd += np.prod([2 + 1, *sz], dtype=np.int64)
        return self.encoder.compute_conv_feature_map_size(input_size) + seg + bnd
