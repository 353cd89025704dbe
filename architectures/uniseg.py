"""UniSeg: a learned universal prompt for multi-task segmentation (Ye et al., MICCAI 2023).

Built on nnU-Net's encoder and decoder from the plans' architecture kwargs (PlainConvUNet or
ResidualEncoderUNet style; parameter names ``encoder.*`` / ``decoder.*`` as in the stock networks):

* **Universal prompt** ``prompt``: a learned tensor (1, T, *bottleneck size*), the bottleneck size being the
  patch size divided by the product of the encoder strides (:func:`bottleneck_size`; e.g. (1, 11, 4, 6, 6) for
  11 tasks and a 64x192x192 patch with 5 poolings);
* **Fusion** ``fusion``: ``concat(bottleneck features, prompt broadcast over the batch)`` -> three 3x3x3
  conv-norm-nonlinearity blocks ``(C+T) -> (C+T)//4 -> (C+T)//4 -> T`` giving one task-specific prompt per task;
* the channel of the sample's task is concatenated to the bottleneck, so the first decoder stage
  (``decoder.transpconvs.0``) takes ``C+1`` channels; the rest of the decoder is nnU-Net's;
* the network outputs ``K = max_t K_t`` channels (``K_t``: classes of task t including background); a task's
  logits are channels ``0..K_t-1`` (the trainer slices them for the loss).

**Task identity is an argument.** ``forward(x, task_ids)`` with a (B,) long tensor (any mode) returns the
local logits (B, K, *spatial) of each sample's own task (a list with deep supervision). The trainer derives the
ids from ``batch['keys']`` through the task registry. No task attribute is stored on the module, so
torch.compile and DDP see the same graph on every rank.

**Without task ids** (nnU-Net's predictor calls ``network(x)``; eval mode only): every task is predicted with
one encoder pass and ONE batched decoder pass (the bottleneck and skips repeated for the T task prompts) and the
results are merged into nnU-Net logits over the dataset's global label space (:meth:`UniSeg.forward_global`):
per task the softmax over its ``K_t`` classes gives for every class j the margin
``m_j = p_j - max_{i != j} p_i`` (positive iff j is the task's argmax); the global logit of label l is the
largest margin among the (task, class) pairs mapped to l, background is 0, a label no (selected) task segments
is -1. So argmax (what nnU-Net's export does after softmax) gives background iff every task predicts background,
otherwise the foreground label predicted with the largest margin.

**Tasks with different image channels** (CT 1, CT+PET 2, BraTS 4; the paper's modality-specific first convs).
The dataset holds ``C_max`` channels (tasks with fewer channels are zero-padded: see
``nnunet-ext uniseg merge``). ``task_channels[t]`` is the number of leading channels task t's images have; the
distinct counts are the *modality groups*. The encoder's first convolution gets ``sum_g c_g`` input channels:
group g owns the input slots ``offset_g .. offset_g + c_g - 1``, and a sample of group g has its ``c_g``
channels scattered into its slots and zeros elsewhere. Convolution is linear, so this equals a separate first
convolution per group (its own kernels; only the conv bias, if the plans use one, is shared by the groups).
With one group the scatter is the identity and the network is exactly nnU-Net's. In all-task mode a sample's
group is the number of leading channels that are not identically zero in the window (zero-padded channels stay
exactly 0 after nnU-Net's z-score normalisation); tasks of other groups are left out for that sample; an input
with fewer than ``C_max`` channels is zero-padded first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import (
    convert_conv_op_to_dim,
    get_matching_convtransp,
)
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.architectures.encoders import IntOrSeq
from nnunet_ext.architectures.task_network import MultiTaskNetwork

__all__ = ["UniSeg", "bottleneck_size", "modality_groups"]


def bottleneck_size(patch_size: Sequence[int], strides: Sequence) -> tuple[int, ...]:
    """Spatial size of the bottleneck for a patch: every axis divided by the product of the encoder strides.
    Raises ValueError if a stride does not divide the patch (nnU-Net's planners never produce that)."""
    size = [int(p) for p in patch_size]
    for s in strides:
        s = [int(s)] * len(size) if isinstance(s, (int, np.integer)) else [int(v) for v in s]
        if len(s) != len(size):
            raise ValueError(f"stride {s} does not match the patch dimensionality {len(size)}")
        for i, v in enumerate(s):
            if size[i] % v:
                raise ValueError(
                    f"patch size {list(patch_size)} is not divisible by the strides {list(strides)}"
                )
            size[i] //= v
    return tuple(size)


def modality_groups(task_channels: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(channel count of each group (ascending), group index of each task, first stem slot of each group)."""
    counts = sorted({int(c) for c in task_channels})
    group_of = [counts.index(int(c)) for c in task_channels]
    offsets = [int(v) for v in np.cumsum([0, *counts[:-1]])]
    return counts, group_of, offsets


class UniSeg(MultiTaskNetwork):
    """UniSeg on nnU-Net's encoders; see the module docstring.

    ``num_classes``: nnU-Net's number of output channels of the dataset (global label space), the eval output
    without task ids. ``task_labels``: per task the global label values of its classes 1..K_t-1 (in order);
    default one task segmenting every label. ``patch_size``: the training patch size (prompt shape).
    ``task_channels``: per task its number of image channels (default: all ``input_channels``).
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
        task_labels: Sequence[Sequence[int]] | None = None,
        patch_size: Sequence[int] | None = None,
        task_channels: Sequence[int] | None = None,
        **encoder_kwargs,
    ):
        super().__init__()
        self._init_tasks(task_labels, num_classes)
        task_labels = self.task_labels
        if patch_size is None:
            raise ValueError("UniSeg needs the training patch_size (the prompt has the bottleneck's shape)")
        self.task_classes = [len(labs) + 1 for labs in task_labels]  # K_t incl. background
        self.num_outputs = max(self.task_classes)  # K
        self.input_channels = int(input_channels)
        task_channels = (
            [self.input_channels] * self.num_tasks if task_channels is None else list(task_channels)
        )
        if len(task_channels) != self.num_tasks or any(
            not 0 < int(c) <= input_channels for c in task_channels
        ):
            raise ValueError(
                f"task_channels needs one channel count in 1..{input_channels} per task ({self.num_tasks}), "
                f"got {task_channels}"
            )
        self.task_channels = [int(c) for c in task_channels]
        self.group_channels, self.task_group, self.group_offsets = modality_groups(self.task_channels)
        stem_inputs = sum(self.group_channels)
        n_conv_per_stage_decoder = self._build_encoder(
            stem_inputs,
            n_stages,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            n_conv_per_stage_decoder,
            nonlin_first,
            encoder_kwargs,
        )
        self.decoder = UNetDecoder(
            self.encoder,
            self.num_outputs,
            n_conv_per_stage_decoder,
            deep_supervision,
            nonlin_first=nonlin_first,
        )
        c = self.encoder.output_channels[-1]
        # first decoder stage: bottleneck + the task's prompt channel
        old = self.decoder.transpconvs[0]
        self.decoder.transpconvs[0] = get_matching_convtransp(conv_op)(
            c + 1, old.out_channels, old.kernel_size, old.stride, bias=old.bias is not None
        )
        self.patch_size = [int(p) for p in patch_size]
        self.prompt_size = bottleneck_size(self.patch_size, self.encoder.strides)
        t = self.num_tasks
        # the official UniSeg: nn.Parameter(torch.randn(1, T, *bottleneck)) (std 1)
        self.prompt = nn.Parameter(torch.randn(1, t, *self.prompt_size))
        mid = (c + t) // 4
        if mid < 1:
            raise ValueError("bottleneck features + tasks must be at least 4 for the fusion blocks")
        kernel = [3] * convert_conv_op_to_dim(conv_op)
        enc = self.encoder
        self.fusion = nn.Sequential(
            *[
                ConvDropoutNormReLU(
                    conv_op,
                    cin,
                    cout,
                    kernel,
                    1,
                    enc.conv_bias,
                    enc.norm_op,
                    enc.norm_op_kwargs,
                    None,
                    None,
                    enc.nonlin,
                    enc.nonlin_kwargs,
                    nonlin_first,
                )
                for cin, cout in ((c + t, mid), (mid, mid), (mid, t))
            ]
        )
        self._init_merge_weights()
        self._register_tables()

    # -------------------------------------------------------------------------------------- construction
    def _register_tables(self) -> None:
        """Non-persistent buffers: channel scatter per modality group, label lookup for the global merge."""
        g, c_in = len(self.group_channels), self.input_channels
        scatter = torch.zeros(g, sum(self.group_channels), c_in)
        for gi, (cg, off) in enumerate(zip(self.group_channels, self.group_offsets)):
            scatter[gi, off + torch.arange(cg), torch.arange(cg)] = 1.0
        self.register_buffer("group_scatter", scatter, persistent=False)  # (G, sum c_g, C)
        self.register_buffer("task_group_index", torch.tensor(self.task_group), persistent=False)  # (T,)
        self.register_buffer("group_counts", torch.tensor(self.group_channels), persistent=False)  # (G,)
        # global label l <- (task t, class j) pairs, as indices into the flattened (T*K) margins; T*K = "none"
        t, k = self.num_tasks, self.num_outputs
        covers: list[list[int]] = [[] for _ in range(self.num_classes)]
        for ti, labs in enumerate(self.task_labels):
            for j, v in enumerate(labs):
                covers[v].append(ti * k + j + 1)
        width = max(1, max(len(c) for c in covers))
        table = torch.full((self.num_classes, width), t * k, dtype=torch.long)
        for v, cv in enumerate(covers):
            if cv:
                table[v, : len(cv)] = torch.tensor(cv, dtype=torch.long)
        self.register_buffer("label_sources", table, persistent=False)  # (num_classes, width)
        valid = torch.zeros(t, k, dtype=torch.bool)
        for ti, kt in enumerate(self.task_classes):
            valid[ti, :kt] = True
        self.register_buffer("class_valid", valid, persistent=False)  # (T, K)
        labels = torch.full((t, k - 1), -1, dtype=torch.long)
        for ti, labs in enumerate(self.task_labels):
            labels[ti, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        self.register_buffer(
            "structure_labels", labels, persistent=False
        )  # (T, K-1): global label of class j+1

    @property
    def num_structures(self) -> int:
        return self.num_outputs - 1

    # ---------------------------------------------------------------------------------------------- parts
    def _pad_channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < self.input_channels:  # absent modalities = zero channels (as in the padded dataset)
            pad = x.new_zeros(x.shape[0], self.input_channels - x.shape[1], *x.shape[2:])
            x = torch.cat((x, pad), 1)
        return x

    def stem_input(self, x: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """Scatter each sample's channels into its modality group's stem slots ((B,) group index)."""
        if len(self.group_channels) == 1 and self.group_channels[0] == self.input_channels:
            return x
        b = x.shape[0]
        if groups is None:
            groups = torch.zeros(b, dtype=torch.long, device=x.device)
        sel = self.group_scatter[groups].to(x.dtype)  # (B, S, C)
        return torch.matmul(sel, x.reshape(b, x.shape[1], -1)).reshape(b, sel.shape[1], *x.shape[2:])

    def detect_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group index (B,), has-a-group mask (B,)) from the number of leading non-zero channels of x."""
        b, c = x.shape[:2]
        present = x.detach().abs().reshape(b, c, -1).amax(-1) > 0  # (B, C)
        idx = torch.arange(1, c + 1, device=x.device)
        count = (present.long() * idx).amax(1)  # (B,) leading channels in use
        fits = self.group_counts.view(1, -1) >= count.view(-1, 1)  # (B, G)
        group = torch.where(
            fits.any(1), fits.float().argmax(1), torch.full_like(count, len(self.group_channels) - 1)
        )
        return group, count > 0

    def fused_prompts(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, T, *bottleneck spatial): the task-specific prompts from bottleneck features and the prompt."""
        prompt = self.prompt
        if tuple(prompt.shape[2:]) != tuple(bottleneck.shape[2:]):  # another input size than the patch
            mode = "trilinear" if prompt.ndim == 5 else "bilinear"
            prompt = nn.functional.interpolate(
                prompt, size=bottleneck.shape[2:], mode=mode, align_corners=False
            )
        prompt = prompt.to(bottleneck.dtype).expand(bottleneck.shape[0], -1, *bottleneck.shape[2:])
        return self.fusion(torch.cat((bottleneck, prompt), 1))

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None):
        """Local logits of each sample's task (``task_ids`` (B,) long), or - in eval mode, without task ids -
        nnU-Net logits over the global label space from all tasks (see the module docstring). In training mode
        without task ids (only shape / cost checks do that) every sample uses task 0."""
        if task_ids is None:
            if not self.training:
                return self.forward_global(x)
            # training mode without tasks (e.g. `nnunet-ext plans check`: shapes and cost): the first task.
            # The trainer always passes each batch's tasks.
            task_ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self._pad_channels(x)
        task_ids = task_ids.to(x.device, torch.long).reshape(-1)
        if task_ids.numel() == 1 and x.shape[0] > 1:
            task_ids = task_ids.expand(x.shape[0])
        skips = self.encoder(self.stem_input(x, self.task_group_index[task_ids]))
        fused = self.fused_prompts(skips[-1])  # (B, T, ...)
        idx = task_ids.view(-1, 1, *([1] * (fused.ndim - 2))).expand(-1, 1, *fused.shape[2:])
        own = torch.gather(fused, 1, idx)
        return self.decoder([*skips[:-1], torch.cat((skips[-1], own), 1)])

    def forward_tasks(self, x: torch.Tensor, tasks: Sequence[int] | None = None):
        """Local logits (B, T', K, *spatial) of the tasks ``tasks`` (default all) for every sample: the encoder
        and fusion run once, the decoder once on a batch of B * T' (bottleneck + each task's prompt), and
        (B,) group indices and has-group mask of the samples (tasks of other groups are meaningless there)."""
        x = self._pad_channels(x)
        tasks = self.task_indices(tasks)
        b = x.shape[0]
        if len(self.group_channels) > 1:
            groups, has = self.detect_groups(x)
        else:
            groups = torch.zeros(b, dtype=torch.long, device=x.device)
            has = torch.ones(b, dtype=torch.bool, device=x.device)
        skips = self.encoder(self.stem_input(x, groups))
        fused = self.fused_prompts(skips[-1])[:, tasks]  # (B, T', ...)
        n = len(tasks)

        def rep(s):
            return s.unsqueeze(1).expand(b, n, *s.shape[1:]).reshape(b * n, *s.shape[1:])

        bottleneck = torch.cat((rep(skips[-1]), fused.reshape(b * n, 1, *fused.shape[2:])), 1)
        out = self.decoder([*(rep(s) for s in skips[:-1]), bottleneck])
        if isinstance(out, (list, tuple)):
            out = out[0]  # full resolution (the predictor disables deep supervision anyway)
        return out.reshape(b, n, *out.shape[1:]), groups, has

    def task_probabilities(self, x: torch.Tensor, tasks: Sequence[int] | None = None) -> torch.Tensor:
        """Per-task softmax probabilities (B, T, K, *spatial) over each task's own classes (classes beyond K_t
        are 0). Tasks not in ``tasks`` and tasks of another modality group than the sample are background
        (probability 1 on class 0), so they never claim a voxel."""
        tasks = self.task_indices(tasks)
        local, groups, has = self.forward_tasks(x, tasks)  # (B, T', K, ...)
        b, n, k = local.shape[:3]
        spatial = local.shape[3:]
        tidx = torch.tensor(tasks, device=local.device)
        valid = self.class_valid[tidx].view(1, n, k, *([1] * len(spatial)))
        logits = torch.where(valid, local.float(), torch.full_like(local, float("-inf"), dtype=torch.float32))
        prob = torch.softmax(logits, 2)
        compatible = (self.task_group_index[tidx].view(1, n) == groups.view(b, 1)) & has.view(b, 1)  # (B, T')
        background = torch.zeros_like(prob[:1, :1])
        background[:, :, 0] = 1.0
        prob = torch.where(compatible.view(b, n, 1, *([1] * len(spatial))), prob, background)
        full = background.expand(b, self.num_tasks, k, *spatial).clone()
        full[:, tidx] = prob
        return full

    def task_scores(self, x: torch.Tensor, tasks: Sequence[int] | None = None) -> torch.Tensor:
        """(B, T*K, *spatial) per-task softmax probabilities: what ``nnunet-ext predict`` and the own-task
        validation average over mirrors and windows before deciding (as the official UniSeg averages softmax)."""
        prob = self.task_probabilities(x, tasks)
        return prob.reshape(prob.shape[0], -1, *prob.shape[3:])

    def decide_tasks(self, prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's own decision from (B, T*K, *spatial) probabilities: the argmax of its classes (``choice``
        (B, T, ...) long, 0 background, j: class j = structure j-1) and the margin top-1 minus top-2 (0 for
        background)."""
        b, t, k = prob.shape[0], self.num_tasks, self.num_outputs
        p = prob.float().reshape(b, t, k, *prob.shape[2:])
        valid = self.class_valid.view(1, t, k, *([1] * (p.ndim - 3)))
        p = torch.where(valid, p, torch.full_like(p, -1.0))
        top2 = torch.topk(p, 2, dim=2)
        choice = top2.indices[:, :, 0]
        margin = top2.values[:, :, 0] - top2.values[:, :, 1]
        return choice, torch.where(choice > 0, margin, torch.zeros_like(margin))

    def forward_global(self, x: torch.Tensor, tasks: Sequence[int] | None = None) -> torch.Tensor:
        """nnU-Net logits (B, num_classes, *spatial) over the global label space from the tasks ``tasks``
        (default all): per task the margin of each class over the task's best other class (positive iff it is
        the task's own decision), times the stored cross-task weight of that (task, class); a label's logit is
        the largest weighted margin among the (task, class) pairs mapped to it, background 0, others -1."""
        prob = self.task_probabilities(x, tasks)  # (B, T, K, ...)
        b, t, k = prob.shape[:3]
        spatial = prob.shape[3:]
        valid = self.class_valid.view(1, t, k, *([1] * len(spatial)))
        p = torch.where(valid, prob, torch.full_like(prob, -1.0))
        top2 = torch.topk(p, 2, dim=2).values
        first, second = top2[:, :, :1], top2[:, :, 1:2]
        margin = torch.where(p >= first, p - second, p - first)
        w = torch.cat((torch.ones_like(self.merge_weights[:, :1]), self.merge_weights), 1).float()
        margin = margin * w.view(1, t, k, *([1] * len(spatial)))
        selected = torch.zeros(t, dtype=torch.bool, device=prob.device)
        selected[list(range(t)) if tasks is None else [int(i) for i in tasks]] = True
        margin = torch.where(
            valid & selected.view(1, t, 1, *([1] * len(spatial))), margin, -torch.ones_like(margin)
        )
        # flattened (T*K) + "none" channel
        flat = torch.cat((margin.reshape(b, t * k, *spatial), margin.new_full((b, 1, *spatial), -1.0)), 1)
        u = flat[:, self.label_sources.flatten()].reshape(b, self.num_classes, -1, *spatial).amax(2)
        u[:, 0] = 0.0
        return u

    # ------------------------------------------------------------------------------------------- nnU-Net
    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Feature-map voxels (nnU-Net's VRAM proxy): encoder + decoder + fusion at the bottleneck."""
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), (
            "give the spatial image size only, e.g. input_size=(x, y, z)"
        )
        total = self.encoder.compute_conv_feature_map_size(input_size)
        total += self.decoder.compute_conv_feature_map_size(input_size)
        size = bottleneck_size(input_size, self.encoder.strides)
        c, t = self.encoder.output_channels[-1], self.num_tasks
        total += np.prod([2 * ((c + t) // 4) + t + 1, *size], dtype=np.int64)
        return total
