"""DoDNet: one backbone, dynamic per-task heads (Zhang et al., CVPR 2021, arXiv 2011.10217).

Built on nnU-Net's encoder and decoder from the plans' architecture kwargs (PlainConvUNet or
ResidualEncoderUNet style):

* the decoder is a stock :class:`UNetDecoder` whose 1x1(x1) output layers (``decoder.seg_layers``) reduce the
  decoder features to ``head_channels`` (8) channels, at every stage;
* a controller (``task_heads.seg_layers.controller``: a linear map = a 1x1x1 conv on the pooled vector)
  maps ``concat(global average pooled bottleneck, one-hot task)`` to the parameters of a dynamic head of
  1x1(x1) convs ``8 -> 8 -> 8 -> K`` with ReLU between them (162 parameters for K = 2);
* the dynamic head is applied per sample AND per task: a grouped 1x1 convolution (groups = B * T), computed as
  a batched matrix product (:func:`apply_dynamic_heads`; ``impl="conv"`` runs DoDNet's grouped ``conv3d``).

**All tasks in one pass.** ``forward(x)`` takes the image only (nnU-Net's predictor and training loop call
``network(x)``; no side-channel task attribute, so torch.compile and DDP work). It generates the heads of
all T tasks from one backbone pass. In training mode it returns the task-major per-structure logits
(B, T*K, *spatial) - a list with deep supervision - and the trainer's loss picks each sample's task channels
from ``batch['keys']`` (:class:`nnunet_ext.multitask.partial_labels.PartialLabelLoss`).

**Deep supervision.** The same per-sample dynamic head (its parameters come from the bottleneck, which all
scales share) is applied to the 8-channel reduction of every decoder stage; each scale is supervised with
the same loss and nnU-Net's weights.

**Eval mode: universal logits.** In eval mode ``forward`` returns nnU-Net-style logits over the unified
label space (B, num_classes, *spatial) (:meth:`DoDNet.universal_logits`): every task first decides with
DoDNet's rule (its last structure with sigmoid p > 0.5: tumour over organ, else background), then across tasks
the claim with the largest ``w * 2 (p - 0.5)`` wins, ``w`` the stored cross-task weight (the structure's
own-task validation Dice, buffer ``task_heads.seg_layers.merge_weights``; 1 until validation sets it). A voxel
no task claims is background; a label no task segments is never predicted. nnU-Net's predictor averages these
logits over windows and mirrors, an approximation of DoDNet's "average the probabilities, then threshold";
``nnunet-ext predict`` decodes exactly from :meth:`DoDNet.task_scores` (docs/dodnet.md). ``set_inference_tasks``
restricts the eval output to some tasks (an inference setting, not used in training).

**Pretrained weights.** Every parameter of the head generator lives under ``task_heads.seg_layers.``:
nnU-Net's ``-pretrained_weights`` neither requires nor transfers ``.seg_layers.`` keys, so a plain nnU-Net
checkpoint of the same plans loads into encoder and decoder (the 8-channel reductions and the controller keep
their initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_ext.architectures.encoders import IntOrSeq, build_nnunet_encoder
from nnunet_ext.architectures.task_network import MultiTaskNetwork

__all__ = [
    "DoDNet",
    "DynamicHeadController",
    "dynamic_head_layers",
    "dynamic_head_num_params",
    "apply_dynamic_heads",
    "build_nnunet_encoder",
]


def dynamic_head_layers(head_channels: int, num_layers: int, out_channels: int) -> list[tuple[int, int]]:
    """(in, out) channels of the dynamic head's 1x1 convs: ``C -> C -> ... -> out`` (``num_layers`` convs)."""
    if num_layers < 1:
        raise ValueError("the dynamic head needs at least one layer")
    return [(head_channels, head_channels)] * (num_layers - 1) + [(head_channels, out_channels)]


def dynamic_head_num_params(layers: Sequence[tuple[int, int]]) -> int:
    """Weights + biases of a dynamic head (8->8->8->2: 64 + 64 + 16 weights + 8 + 8 + 2 biases = 162)."""
    return sum(cin * cout + cout for cin, cout in layers)


def apply_dynamic_heads(
    features: torch.Tensor, params: torch.Tensor, layers: Sequence[tuple[int, int]], impl: str = "matmul"
) -> torch.Tensor:
    """Apply one dynamic head per (sample, task): a per-sample grouped 1x1(x1) convolution.

    ``features`` (B, C, *spatial); ``params`` (B, T, P) laid out as DoDNet does: all layers' weights, then
    all layers' biases. Returns (B, T * K, *spatial), task-major. ``impl="conv"`` runs it as DoDNet's code does
    (``F.conv3d`` with groups = B * T on a (1, B*T*C, ...) tensor); ``impl="matmul"`` (default) computes the same
    1x1 convolutions as one batched matrix product per layer (weights (B, T, out, in) @ features (B, 1, in, N)),
    which avoids materialising T copies of the features and is about 2x faster on the CPU.
    """
    b, c = features.shape[:2]
    t = params.shape[1]
    spatial = features.shape[2:]
    n_w = [cin * cout for cin, cout in layers]
    n_b = [cout for _, cout in layers]
    chunks = torch.split(params, n_w + n_b, dim=2)
    weights, biases = chunks[: len(layers)], chunks[len(layers) :]
    if impl == "matmul":
        x = features.to(params.dtype).reshape(b, 1, c, -1)
        for i, (cin, cout) in enumerate(layers):
            x = torch.matmul(weights[i].reshape(b, t, cout, cin), x) + biases[i].reshape(b, t, cout, 1)
            if i < len(layers) - 1:
                x = F.relu(x)
        return x.reshape(b, t * layers[-1][1], *spatial)
    if impl != "conv":
        raise ValueError(f"impl must be 'matmul' or 'conv', got {impl!r}")
    nd = len(spatial)
    conv = F.conv3d if nd == 3 else F.conv2d if nd == 2 else F.conv1d
    x = features.unsqueeze(1).expand(b, t, c, *spatial).reshape(1, b * t * c, *spatial).to(params.dtype)
    for i, (cin, cout) in enumerate(layers):
        w = weights[i].reshape(b * t * cout, cin, *([1] * nd))
        x = conv(x, w, biases[i].reshape(b * t * cout), groups=b * t)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(b, t * layers[-1][1], *spatial)


class DynamicHeadController(nn.Module):
    """DoDNet's controller: ``Linear(concat(GAP(bottleneck), one_hot(task)))`` -> head parameters, for every
    task at once: (B, C) pooled features -> (B, T, P). Its linear layer keeps PyTorch's default initialisation,
    as in DoDNet's code (nnU-Net's He init touches convolutions only)."""

    def __init__(self, in_features: int, num_tasks: int, num_params: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.controller = nn.Linear(in_features + num_tasks, num_params)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        bottleneck = skips[-1]
        pooled = bottleneck.mean(dim=tuple(range(2, bottleneck.ndim)))  # (B, C)
        b = pooled.shape[0]
        onehot = torch.eye(self.num_tasks, device=pooled.device, dtype=pooled.dtype)
        cond = torch.cat(
            (pooled.unsqueeze(1).expand(b, self.num_tasks, -1), onehot.unsqueeze(0).expand(b, -1, -1)), 2
        )
        return self.controller(cond)  # (B, T, P)


class TaskHeadBranch(nn.Module):
    """Gives the head generator the key prefix ``task_heads.seg_layers.`` (see the module docstring)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.seg_layers = generator


class DoDNet(MultiTaskNetwork):
    """DoDNet on nnU-Net's encoders; see the module docstring.

    ``task_labels``: per task the label values it segments, in channel order (outer to inner, e.g.
    ``[[1, 2], [3, 4], [5]]``); default: one task segmenting every label ``1..num_classes-1``.
    ``num_classes`` is nnU-Net's number of output channels (background + labels): the eval output.
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
        head_channels: int = 8,
        head_layers: int = 3,
        num_structures: int | None = None,
        **encoder_kwargs,
    ):
        super().__init__()
        self._init_tasks(task_labels, num_classes)
        task_labels = self.task_labels
        self.num_structures = int(num_structures or max(len(labs) for labs in task_labels))
        if self.num_structures < max(len(labs) for labs in task_labels):
            raise ValueError("num_structures must be at least the largest number of labels of a task")
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
        # the decoder's seg_layers ARE the reduction of the last features to `head_channels` (at every stage)
        self.decoder = UNetDecoder(
            self.encoder, head_channels, n_conv_per_stage_decoder, deep_supervision, nonlin_first=nonlin_first
        )
        self.head_channels = int(head_channels)
        self.head_layers = dynamic_head_layers(head_channels, head_layers, self.num_structures)
        self.num_head_params = dynamic_head_num_params(self.head_layers)
        self.task_heads = TaskHeadBranch(self._build_generator())
        self._init_merge_weights()
        self._register_label_maps()

    # -------------------------------------------------------------------------------------- construction
    def _build_generator(self) -> nn.Module:
        return DynamicHeadController(self.encoder.output_channels[-1], self.num_tasks, self.num_head_params)

    def _register_label_maps(self) -> None:
        """Non-persistent buffers (not in the state dict): the label, rank and task of every output channel."""
        t, k = self.num_tasks, self.num_structures
        channel_label = torch.full((t * k,), -1, dtype=torch.long)
        channel_task = torch.arange(t).repeat_interleave(k)
        rank = torch.zeros(self.num_classes)
        for ti, labs in enumerate(self.task_labels):
            for j, v in enumerate(labs):
                channel_label[ti * k + j] = v
                rank[v] = max(float(rank[v]), float(j))
        onehot = torch.zeros(self.num_classes, t * k)
        valid = channel_label >= 0
        onehot[channel_label[valid], torch.nonzero(valid).flatten()] = 1.0
        self.register_buffer("channel_onehot", onehot, persistent=False)  # (num_classes, T*K)
        self.register_buffer("channel_task", channel_task, persistent=False)  # (T*K,)
        self.register_buffer("label_rank", rank, persistent=False)  # (num_classes,)
        self.register_buffer("inference_task_mask", torch.ones(t), persistent=False)  # (T,)
        self.register_buffer("structure_labels", channel_label.view(t, k).clone(), persistent=False)  # (T, K)
        #: per label value the task-major channels that segment it (plain lists: constant, no state)
        self.label_channels = [
            [int(c) for c in torch.nonzero(channel_label == v).flatten()] for v in range(self.num_classes)
        ]

    def merge_weights_owner(self) -> nn.Module:
        return self.task_heads.seg_layers

    @property
    def merge_weights(self) -> torch.Tensor:
        """(T, K) cross-task weights of the universal merge (own-task validation Dice; 1 = equal weights)."""
        return self.task_heads.seg_layers.merge_weights

    # ------------------------------------------------------------------------------------------ inference
    def set_inference_tasks(self, tasks: Sequence[int] | None) -> None:
        """Eval output for these task indices only (``None``: all tasks, the universal prediction)."""
        mask = torch.zeros_like(self.inference_task_mask)
        mask[self.task_indices(tasks)] = 1.0
        self.inference_task_mask.copy_(mask)

    def structure_probabilities(self, task_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-label sigmoid probabilities (B, num_classes, *spatial) from task-major logits, averaged over the
        selected tasks that segment a label, and the (num_classes,) bool mask of labels some selected task
        segments (background is never covered)."""
        weights = self.channel_onehot * self.inference_task_mask[self.channel_task].unsqueeze(0)
        counts = weights.sum(1)
        covered = counts > 0
        weights = weights / counts.clamp_min(1.0).unsqueeze(1)
        prob = torch.sigmoid(task_logits.float())
        b, c = prob.shape[:2]
        per_label = torch.matmul(weights, prob.reshape(b, c, -1)).reshape(
            b, self.num_classes, *prob.shape[2:]
        )
        return per_label, covered

    def decide_tasks(self, prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's own decision from per-structure probabilities (B, T*K, *spatial) (DoDNet's rule): the last
        structure of the task with p > 0.5 (tumour over organ), else background. Returns ``choice`` (B, T, ...)
        long (0 background, j + 1 structure j) and ``margin`` (B, T, ...) = 2 (p - 0.5) of the chosen structure
        (0 for background)."""
        b, t, k = prob.shape[0], self.num_tasks, self.num_structures
        p = prob.float().reshape(b, t, k, *prob.shape[2:])
        valid = (self.structure_labels >= 0).view(1, t, k, *([1] * (p.ndim - 3)))
        fg = (p > 0.5) & valid
        rank = torch.arange(1, k + 1, device=p.device).view(1, 1, k, *([1] * (p.ndim - 3)))
        choice = (fg.long() * rank).amax(2)  # (B, T, ...)
        chosen = torch.gather(p, 2, (choice - 1).clamp_min(0).unsqueeze(2))[:, :, 0]
        margin = torch.where(choice > 0, 2 * (chosen - 0.5), torch.zeros_like(chosen))
        return choice, margin

    def universal_logits(self, task_logits: torch.Tensor) -> torch.Tensor:
        """Softmax-compatible logits over the unified label space (see the module docstring): per (task,
        structure) ``v = w * 2 (p - 0.5)``, except that a structure with p > 0.5 that its own task overrules (the
        organ under a tumour of the same task) gets 0; a label's logit is the largest ``v`` of the selected
        (task, structure) pairs mapped to it, background 0, a label no selected task segments -1."""
        prob = torch.sigmoid(task_logits.float())
        b, t, k = prob.shape[0], self.num_tasks, self.num_structures
        spatial = prob.shape[2:]
        choice, _ = self.decide_tasks(prob)
        p = prob.reshape(b, t, k, *spatial)
        w = self.merge_weights.float().view(1, t, k, *([1] * len(spatial)))
        v = w * 2 * (p - 0.5)
        rank = torch.arange(1, k + 1, device=p.device).view(1, 1, k, *([1] * len(spatial)))
        overruled = (p > 0.5) & (rank != choice.unsqueeze(2))
        v = torch.where(overruled, torch.zeros_like(v), v)
        selected = (self.inference_task_mask > 0).view(1, t, 1, *([1] * len(spatial)))
        real = (self.structure_labels >= 0).view(1, t, k, *([1] * len(spatial)))
        v = torch.where(selected & real, v, torch.full_like(v, -2.0)).reshape(b, t * k, *spatial)
        # label l <- max over its (task, structure) channels (constant index lists, built at construction)
        parts = [torch.zeros_like(v[:, :1])]
        for chans in self.label_channels[1:]:
            parts.append(v[:, chans].amax(1, keepdim=True) if chans else torch.full_like(v[:, :1], -1.0))
        u = torch.cat(parts, 1)
        return torch.where(u < -1.5, torch.full_like(u, -1.0), u)

    def task_scores(self, x: torch.Tensor, tasks: Sequence[int] | None = None) -> torch.Tensor:
        """Per-structure sigmoid probabilities (B, T*K, *spatial) of every task, full resolution: what
        ``nnunet-ext predict`` and the own-task validation average over mirrors and windows before deciding
        (DoDNet's inference). ``tasks``: other tasks' channels are 0 (never chosen)."""
        out = self.forward_tasks(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        prob = torch.sigmoid(out.float())
        if tasks is not None:
            keep = torch.zeros(self.num_tasks, dtype=torch.bool, device=prob.device)
            keep[self.task_indices(tasks)] = True
            prob = prob * keep[self.channel_task].view(1, -1, *([1] * (prob.ndim - 2))).to(prob.dtype)
        return prob

    # -------------------------------------------------------------------------------------------- forward
    def head_parameters(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """(B, T, P) dynamic head parameters of every task for every sample."""
        return self.task_heads.seg_layers(skips)

    def heads_and_skips(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Head parameters and the skips the decoder gets (DoDNet: unchanged; TransDoDNet adds its memory)."""
        return self.head_parameters(skips), skips

    def forward_tasks(self, x: torch.Tensor, task_ids: torch.Tensor | None = None):
        """Task-major per-structure logits (B, T*K, *spatial) of every task; a list (full resolution first)
        with deep supervision. What ``forward`` returns in training mode, in any mode.

        With ``task_ids`` (B,) only each sample's OWN task head runs (as in DoDNet, where a sample's one-hot task
        code generates its single head): (B, K, *spatial). Training needs nothing else, and the head work does
        not grow with the number of tasks."""
        skips = self.encoder(x)
        params, skips = self.heads_and_skips(skips)  # (B, T, P)
        features = self.decoder(skips)
        if task_ids is not None:
            index = task_ids.to(params.device, torch.long).view(-1, 1, 1).expand(-1, 1, params.shape[2])
            params = torch.gather(params, 1, index)  # (B, 1, P)
        if isinstance(features, (list, tuple)):
            return [apply_dynamic_heads(f, params, self.head_layers) for f in features]
        return apply_dynamic_heads(features, params, self.head_layers)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None):
        """Training mode: per-structure logits (of every task, or with ``task_ids`` of each sample's own task,
        see :meth:`forward_tasks`). Eval mode without ``task_ids``: universal logits over the unified label
        space (what nnU-Net's predictor expects)."""
        out = self.forward_tasks(x, task_ids)
        if self.training or task_ids is not None:
            return out
        if isinstance(out, list):
            return [self.universal_logits(o) for o in out]
        return self.universal_logits(out)

    # ------------------------------------------------------------------------------------------- nnU-Net
    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Feature-map voxels of a forward pass (nnU-Net's VRAM proxy): encoder + decoder + dynamic heads
        (T heads of ``8 -> 8 -> 8 -> K`` at every supervised resolution, counted per sample)."""
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), (
            "give the spatial image size only, e.g. input_size=(x, y, z)"
        )
        total = self.encoder.compute_conv_feature_map_size(input_size)
        total += self.decoder.compute_conv_feature_map_size(input_size)
        per_voxel = self.num_tasks * (sum(cout for _, cout in self.head_layers) + self.head_channels)
        size = [i // j for i, j in zip(input_size, self.encoder.strides[0])]
        sizes = [list(size)]
        for s in range(1, len(self.encoder.strides) - 1):
            size = [i // j for i, j in zip(size, self.encoder.strides[s])]
            sizes.append(list(size))
        n = len(sizes) if self.decoder.deep_supervision else 1
        for sz in sizes[:n]:
            total += np.prod([per_voxel, *sz], dtype=np.int64)
        return total
