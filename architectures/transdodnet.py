"""TransDoDNet: task queries in a transformer decoder generate the dynamic heads (Xie et al., TMI 2023,
arXiv 2112.10153; DoDNet's successor).

Same backbone, 8-channel reductions, dynamic heads, deep supervision, universal eval output and
``.seg_layers.`` key layout as :class:`nnunet_ext.architectures.dodnet.DoDNet`; only the head generator
differs (``task_heads.seg_layers`` is a :class:`TaskQueryTransformer`):

* the last ``n_levels`` (3) encoder outputs are projected to ``d_model`` (192) channels (1x1 conv = linear on
  tokens), flattened to tokens, and get a sinusoidal position code plus a learned level embedding; a level with
  more than ``max_tokens_per_level`` voxels is average-pooled by 2 along its LARGEST axes until it fits (an
  anisotropic level keeps its short axis: 8 x 12 x 12 -> 8 x 6 x 6);
* ``n_enc_layers`` (3) transformer encoder layers (self-attention over the tokens of all levels);
* ``n_dec_layers`` (3) transformer decoder layers: one learned query per task attends to itself and the
  others (self-attention) and to the multi-scale tokens (cross-attention); 8 heads;
* an MLP (shared by the queries) maps every final task query to the parameters of that task's dynamic head;
* ``add_memory`` (the official default ``--add_memory 2``): the bottleneck level's transformer memory, through a
  1x1 conv + norm + nonlinearity (``memory_proj``), is added to the CNN bottleneck that feeds the decoder.

The paper uses deformable attention (a custom CUDA op); here attention is torch's own
(``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``, which run scaled dot-product attention), so it
compiles, runs under AMP and DDP, and on the CPU. Full attention costs O(tokens^2): the token cap keeps it
bounded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.architectures.dodnet import DoDNet

__all__ = ["TransDoDNet", "TaskQueryTransformer", "sinusoidal_position_code"]


def sinusoidal_position_code(shape, d_model: int, device, dtype) -> torch.Tensor:
    """(prod(shape), d_model) sine/cosine code of normalised voxel coordinates, d_model split over the axes."""
    n = len(shape)
    per_axis = d_model // (2 * n)
    if per_axis == 0:
        return torch.zeros(math.prod(shape), d_model, device=device, dtype=dtype)
    freqs = torch.exp(
        torch.arange(per_axis, device=device, dtype=torch.float32) * (-math.log(1000.0) / per_axis)
    )
    coords = torch.meshgrid(
        *[torch.linspace(0, 1, s, device=device, dtype=torch.float32) * 2 * math.pi for s in shape],
        indexing="ij",
    )
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * freqs.view(1, -1) * 10
        parts += [torch.sin(angles), torch.cos(angles)]
    code = torch.cat(parts, 1)
    if code.shape[1] < d_model:
        code = F.pad(code, (0, d_model - code.shape[1]))
    return code.to(dtype)


class TaskQueryTransformer(nn.Module):
    """Multi-scale encoder features -> (B, T, P) dynamic head parameters via one learned query per task."""

    def __init__(
        self,
        encoder_channels: list[int],
        num_tasks: int,
        num_params: int,
        d_model: int = 192,
        n_heads: int = 8,
        n_levels: int = 3,
        n_enc_layers: int = 3,
        n_dec_layers: int = 3,
        dim_feedforward: int | None = None,
        max_tokens_per_level: int = 1024,
        memory_proj: nn.Module | None = None,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_levels = min(n_levels, len(encoder_channels))
        self.max_tokens_per_level = int(max_tokens_per_level)
        self.d_model = d_model
        self.input_proj = nn.ModuleList(nn.Linear(c, d_model) for c in encoder_channels[-self.n_levels :])
        self.level_embed = nn.Parameter(torch.zeros(self.n_levels, d_model))
        nn.init.normal_(self.level_embed, std=0.02)
        ff = dim_feedforward or 4 * d_model
        self.encoder = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d_model, n_heads, ff, dropout=0.0, batch_first=True, norm_first=True
                ),
                n_enc_layers,
                enable_nested_tensor=False,
            )
            if n_enc_layers > 0
            else None
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, n_heads, ff, dropout=0.0, batch_first=True, norm_first=True),
            n_dec_layers,
        )
        self.norm = nn.LayerNorm(d_model)
        self.task_queries = nn.Parameter(torch.zeros(num_tasks, d_model))
        nn.init.normal_(self.task_queries, std=1.0)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(inplace=True), nn.Linear(d_model, num_params)
        )
        # add_memory: the bottleneck level's transformer memory -> bottleneck channels (1x1 conv, norm, nonlin),
        # added to the CNN bottleneck that feeds the decoder (None: the transformer only generates the heads)
        self.memory_proj = memory_proj

    def token_shapes(self, shapes: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per level (pooling kernel, token grid): while a level has more than ``max_tokens_per_level`` voxels,
        the LARGEST axes (those of maximal size, if >= 2) are average-pooled by 2; the other axes keep their
        resolution, so an anisotropic level (8 x 12 x 12) becomes 8 x 6 x 6, not 4 x 6 x 6."""
        out = []
        for shape in shapes:
            grid = list(shape)
            kernel = [1] * len(grid)
            while math.prod(grid) > self.max_tokens_per_level and max(grid) >= 2:
                top = max(grid)
                for a, n in enumerate(grid):
                    if n == top:
                        grid[a] = n // 2
                        kernel[a] *= 2
            out.append((tuple(kernel), tuple(grid)))
        return out

    def tokens(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self._tokens(skips)[0]

    def _tokens(self, skips: list[torch.Tensor]):
        out, grids = [], []
        levels = skips[-self.n_levels :]
        for i, (f, (kernel, _grid)) in enumerate(
            zip(levels, self.token_shapes([tuple(f.shape[2:]) for f in levels]))
        ):
            if any(k > 1 for k in kernel):
                f = (F.avg_pool3d if f.ndim == 5 else F.avg_pool2d)(f, kernel)
            t = self.input_proj[i](f.flatten(2).transpose(1, 2))  # (B, N, d)
            pos = sinusoidal_position_code(f.shape[2:], self.d_model, t.device, t.dtype)
            out.append(t + pos.unsqueeze(0) + self.level_embed[i].to(t.dtype))
            grids.append(tuple(f.shape[2:]))
        return torch.cat(out, 1), grids

    def forward_with_memory(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, P) head parameters and the bottleneck-level memory projected to the bottleneck's channels and
        size (``None`` without ``memory_proj``)."""
        memory, grids = self._tokens(skips)
        if self.encoder is not None:
            memory = self.encoder(memory)
        b = memory.shape[0]
        queries = self.task_queries.to(memory.dtype).unsqueeze(0).expand(b, -1, -1)
        q = self.norm(self.decoder(queries, memory))  # (B, T, d)
        params = self.mlp(q)  # (B, T, P)
        if self.memory_proj is None:
            return params, None
        n = math.prod(grids[-1])
        last = memory[:, memory.shape[1] - n :].transpose(1, 2).reshape(b, self.d_model, *grids[-1])
        bottleneck = skips[-1]
        if tuple(last.shape[2:]) != tuple(bottleneck.shape[2:]):  # the bottleneck level was pooled
            mode = "trilinear" if last.ndim == 5 else "bilinear"
            last = F.interpolate(last, size=bottleneck.shape[2:], mode=mode, align_corners=False)
        return params, self.memory_proj(last.to(bottleneck.dtype))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.forward_with_memory(skips)[0]


class TransDoDNet(DoDNet):
    """DoDNet with the transformer head generator; see the module docstring. Extra kwargs: ``d_model``,
    ``n_heads``, ``n_levels``, ``n_enc_layers``, ``n_dec_layers``, ``max_tokens_per_level``."""

    def __init__(
        self,
        *args,
        d_model: int = 192,
        n_heads: int = 8,
        n_levels: int = 3,
        n_enc_layers: int = 3,
        n_dec_layers: int = 3,
        max_tokens_per_level: int = 1024,
        add_memory: bool = True,
        **kwargs,
    ):
        object.__setattr__(self, "_add_memory", bool(add_memory))
        object.__setattr__(
            self,
            "_transformer_kwargs",
            dict(
                d_model=d_model,
                n_heads=n_heads,
                n_levels=n_levels,
                n_enc_layers=n_enc_layers,
                n_dec_layers=n_dec_layers,
                max_tokens_per_level=max_tokens_per_level,
            ),
        )
        super().__init__(*args, **kwargs)

    def _build_generator(self) -> nn.Module:
        memory_proj = None
        if self._add_memory:
            enc = self.encoder
            c = enc.output_channels[-1]
            d = self._transformer_kwargs["d_model"]
            memory_proj = nn.Sequential(
                enc.conv_op(d, c, 1, bias=False),
                *([enc.norm_op(c, **(enc.norm_op_kwargs or {}))] if enc.norm_op is not None else []),
                *([enc.nonlin(**(enc.nonlin_kwargs or {}))] if enc.nonlin is not None else []),
            )
        return TaskQueryTransformer(
            list(self.encoder.output_channels),
            self.num_tasks,
            self.num_head_params,
            memory_proj=memory_proj,
            **self._transformer_kwargs,
        )

    def heads_and_skips(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Head parameters, and the skips with the bottleneck-level transformer memory added to the CNN
        bottleneck (TransDoDNet's ``add_memory = 2``: ``memory_conv(memory[-1]) + bottleneck``)."""
        params, memory = self.task_heads.seg_layers.forward_with_memory(skips)
        if memory is None:
            return params, skips
        return params, [*skips[:-1], skips[-1] + memory]
