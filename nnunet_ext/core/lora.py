"""LoRA for nnU-Net networks: inject adapters into convolutions, merge them back, report parameters.

Works on any network built from nnU-Net plans (PlainConvUNet, ResidualEncoderUNet and our own networks):

* :func:`inject_lora` wraps every targeted ``Conv{1,2,3}d`` in peft's LoRA conv layer
  (``peft.tuners.lora.layer.Conv3d`` etc.) and every ``ConvTranspose{1,2,3}d`` in :class:`LoRAConvTranspose`
  (peft rejects transposed convolutions). ``delta = scaling * B(A(x))`` with ``A`` a conv of the base layer's
  kernel/stride/padding to ``rank`` channels, ``B`` a 1x1x1 conv, ``B`` initialised to 0 (outputs are
  unchanged until training moves ``B``), ``scaling = alpha / rank``.
* nnU-Net's alias trap: dynamic-network-architectures registers every conv twice (``.conv`` and
  ``.all_modules.0``) and the forward pass uses ``all_modules``. A by-name replacement (what peft's
  ``get_peft_model`` does) swaps only the first name and changes nothing. Here a module is replaced BY
  IDENTITY in every parent that holds it, so both names point to the same adapted layer (and
  :func:`inject_lora` checks that no un-adapted reference of a targeted conv is left).
* :func:`merge_lora` folds ``W + scaling * delta`` into a plain conv of the original type (own math:
  peft 0.21.2's merge crashes on 1x1x1 Conv3d, peft issue #3768) and puts it back in every parent, so the
  merged network IS the stock network: its ``state_dict`` has the original key names (alias keys included)
  and loads strictly into a freshly built network (nnU-Net's predictor, ``-pretrained_weights``).
* :func:`merged_state_dict` returns the merged weights without touching the network being trained;
  :func:`adapter_state_dict` + :func:`load_merged_with_adapters` store and rebuild the unmerged network from
  the merged weights plus the adapters alone (checkpoints hold the body once).

Layers are chosen by regular expressions (``re.search``) on the module's canonical name (the first name
``named_modules()`` gives, e.g. ``encoder.stages.0.0.convs.0.conv``); ``exclude`` defaults to the
segmentation heads (``seg_layers``), which a fine-tuning trains fully instead.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from nnunet_ext.core.train_step import unwrap

ADAPTER = "default"  # peft's adapter name; one adapter per layer
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how. ``target``/``exclude`` are regexes searched in canonical module names."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target: tuple[str, ...] = (r".",)
    exclude: tuple[str, ...] = (r"seg_layers",)

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        for pattern in (*self.target, *self.exclude):
            re.compile(pattern)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / int(self.rank)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class LoRAReport:
    """Parameter counts of an adapted network (unique parameters; aliases counted once)."""

    total: int
    trainable: int
    adapter: int
    adapted_layers: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / max(1, self.total - self.adapter)

    def __str__(self) -> str:
        base = self.total - self.adapter
        return (
            f"LoRA: {len(self.adapted_layers)} adapted layers; base network {base:,} parameters; "
            f"adapters {self.adapter:,}; trainable {self.trainable:,} "
            f"({100 * self.trainable_fraction:.2f}% of the base network)"
        )


class LoRAConvTranspose(nn.Module):
    """LoRA on a transposed convolution (peft has none): ``base(x) + scaling * B(A(x))``.

    ``A`` is a transposed conv of the base layer's kernel/stride/padding to ``rank`` channels, ``B`` a 1x1x1
    conv to the output channels (zero-initialised), so the adapter is exactly mergeable:
    ``W'[i, o, k] = W[i, o, k] + scaling * sum_r A[i, r, k] * B[o, r]``. Parameter names follow peft
    (``base_layer``, ``lora_A.default``, ``lora_B.default``).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base_layer.groups != 1 or any(d != 1 for d in base_layer.dilation):
            raise ValueError("LoRA on transposed convolutions supports groups=1 and dilation=1 only")
        self.base_layer = base_layer
        dim = base_layer.weight.dim() - 2
        conv_t = type(base_layer)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        w = base_layer.weight
        self.lora_A = nn.ModuleDict(
            {
                ADAPTER: conv_t(
                    base_layer.in_channels,
                    rank,
                    base_layer.kernel_size,
                    base_layer.stride,
                    base_layer.padding,
                    output_padding=base_layer.output_padding,
                    bias=False,
                ).to(device=w.device, dtype=w.dtype)
            }
        )
        self.lora_B = nn.ModuleDict(
            {ADAPTER: conv(rank, base_layer.out_channels, 1, bias=False).to(device=w.device, dtype=w.dtype)}
        )
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.scaling = float(alpha) / int(rank)
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        a = self.lora_A[ADAPTER](self.lora_dropout[ADAPTER](x.to(self.lora_A[ADAPTER].weight.dtype)))
        return out + (self.lora_B[ADAPTER](a) * self.scaling).to(out.dtype)


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(module, (LoraLayer, LoRAConvTranspose))


def _parents_by_identity(net: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) that holds it, aliases included."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in net.modules():  # unique parents; _modules lists every attribute, duplicates included
        for attr, child in parent._modules.items():
            if child is not None:
                holders.setdefault(id(child), []).append((parent, attr))
    return holders


def _replace_everywhere(holders: list[tuple[nn.Module, str]], new: nn.Module) -> None:
    for parent, attr in holders:
        setattr(parent, attr, new)


def _wrap(module: nn.Module, config: LoRAConfig) -> nn.Module:
    if isinstance(module, TRANSPOSED_TYPES):
        return LoRAConvTranspose(module, config.rank, config.alpha, config.dropout)
    from peft import LoraConfig
    from peft.tuners.lora import layer as peft_layer

    if module.groups != 1 or any(d != 1 for d in module.dilation):
        raise ValueError(
            f"LoRA supports convolutions with groups=1 and dilation=1 only (got {module}); exclude this "
            f"layer with a pattern"
        )
    cls = {nn.Conv1d: peft_layer.Conv1d, nn.Conv2d: peft_layer.Conv2d, nn.Conv3d: peft_layer.Conv3d}[
        type(module)
    ]
    peft_config = LoraConfig(
        r=int(config.rank),
        lora_alpha=config.alpha,
        lora_dropout=float(config.dropout),
        init_lora_weights=True,
    )
    return cls(module, ADAPTER, config=peft_config, r=int(config.rank), lora_alpha=config.alpha)


def select_layers(net: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """(canonical name, module) of every convolution that ``config`` targets."""
    chosen = []
    for name, module in net.named_modules():
        if type(module) not in (*CONV_TYPES, *TRANSPOSED_TYPES):
            continue
        if any(re.search(p, name) for p in config.target) and not any(
            re.search(p, name) for p in config.exclude
        ):
            chosen.append((name, module))
    return chosen


def inject_lora(net: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the targeted convolutions of ``net`` in LoRA layers IN PLACE; return the adapted layers' names.

    Load the base weights BEFORE calling this (the adapted network's keys differ from a stock checkpoint's).
    Every reference to a targeted conv (``.conv`` and its ``.all_modules.0`` alias) is replaced.
    """
    if any(_is_lora_layer(m) for m in net.modules()):
        raise ValueError(
            "the network already has LoRA adapters; merge them (merge_lora) before injecting again"
        )
    layers = select_layers(net, config)
    if not layers:
        raise ValueError(
            f"no convolution matches the LoRA patterns target={list(config.target)} "
            f"exclude={list(config.exclude)}"
        )
    holders = _parents_by_identity(net)
    for _, module in layers:
        _replace_everywhere(holders[id(module)], _wrap(module, config))
    # no targeted conv may survive under another name (that path would silently stay un-adapted)
    targets = {id(m) for _, m in layers}
    for name, module in net.named_modules(remove_duplicate=False):
        if id(module) in targets and not name.endswith("base_layer"):
            raise RuntimeError(f"un-adapted reference to a LoRA target left at {name}")
    return [name for name, _ in layers]


def lora_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical name, layer) of every LoRA layer of ``net``."""
    return [(n, m) for n, m in net.named_modules() if _is_lora_layer(m)]


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """``scaling * delta`` in the base layer's weight layout (exact for kernels of any size, 1x1x1 too)."""
    if isinstance(layer, LoRAConvTranspose):
        a = layer.lora_A[ADAPTER].weight  # (in, r, *k)
        b = layer.lora_B[ADAPTER].weight.flatten(1)  # (out, r)
        return torch.einsum("ir...,or->io...", a.float(), b.float()) * layer.scaling
    a = layer.lora_A[ADAPTER].weight  # (r, in, *k)
    b = layer.lora_B[ADAPTER].weight.flatten(1)  # (out, r)
    return torch.einsum("or,ri...->oi...", b.float(), a.float()) * layer.scaling[ADAPTER]


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold every adapter into its base conv IN PLACE (all aliases); ``net`` becomes a stock network."""
    holders = _parents_by_identity(net)
    for _, layer in lora_layers(net):
        base = layer.base_layer
        with torch.no_grad():
            base.weight.add_(delta_weight(layer).to(base.weight.dtype))
        _replace_everywhere(holders[id(layer)], base)
    return net


def strip_lora(net: nn.Module) -> nn.Module:
    """Drop the adapters IN PLACE (every LoRA layer back to its unchanged base conv): the network before
    fine-tuning, e.g. the frozen teacher M_{t-1} of a LoRA fine-tuning."""
    holders = _parents_by_identity(net)
    for _, layer in lora_layers(net):
        _replace_everywhere(holders[id(layer)], layer.base_layer)
    return net


def merged_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The merged network's state dict (stock key names), computed on a copy: ``net`` is left as it is."""
    merged = merge_lora(copy.deepcopy(net))
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (``lora_A`` / ``lora_B``, alias keys included) of an adapted network: with
    the merged stock weights this is everything needed to rebuild the unmerged network
    (:func:`load_merged_with_adapters`), so a checkpoint stores the network body once."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if is_adapter_parameter(k)}


def load_merged_with_adapters(
    net: nn.Module, merged: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]
) -> None:
    """Rebuild an adapted network from the MERGED stock weights plus the adapters (inverse of
    :func:`merged_state_dict` + :func:`adapter_state_dict`). ``net`` must have the adapters injected (same
    config). Every base conv gets ``W_merged - scaling * delta`` (the frozen base weight, to float rounding:
    about 1e-7 relative in float32), everything else (norms, heads) the merged value; strict in both dicts."""
    own = net.state_dict()
    state, missing = {}, []
    for key in own:
        if is_adapter_parameter(key):
            source, stock = adapters, key
        else:
            source, stock = merged, key.replace(".base_layer.", ".")
        if stock not in source:
            missing.append(stock)
        else:
            state[key] = source[stock]
    if missing:
        raise KeyError(
            f"{len(missing)} keys of the adapted network are not in the checkpoint (e.g. {missing[:3]}): it "
            f"was written with another LoRA configuration or network"
        )
    expected = {k.replace(".base_layer.", ".") for k in own if not is_adapter_parameter(k)}
    extra = sorted(set(merged) - expected)[:3] + sorted(set(adapters) - set(own))[:3]
    if extra:
        raise KeyError(
            f"unexpected keys in the checkpoint (e.g. {extra}): another network or LoRA configuration"
        )
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        for _, layer in lora_layers(net):
            weight = layer.base_layer.weight
            weight.sub_(delta_weight(layer).to(weight.device, weight.dtype))


def start_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state of ``net`` without its adapters (stock key names, CPU copies): with the adapters just
    injected, the network the fine-tuning starts from (the frozen base and the heads' starting values)."""
    stock = strip_lora(copy.deepcopy(unwrap(net)))
    return {k: v.detach().cpu().clone() for k, v in stock.state_dict().items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (what makes two states bitwise equal)."""
    h = hashlib.sha256()
    for key in sorted(state):
        v = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def load_exact_base(net: nn.Module, start: dict[str, torch.Tensor]) -> None:
    """Put the frozen base weights of an adapted network back bit-exactly from its :func:`start_state`
    (after :func:`load_merged_with_adapters` rebuilt them to float rounding)."""
    own = net.state_dict()
    keys = {k: k.replace(".base_layer.", ".") for k in own if ".base_layer." in k}
    missing = sorted(s for s in keys.values() if s not in start)
    if missing:
        raise KeyError(f"the start state lacks base weights of the adapted network (e.g. {missing[:3]})")
    with torch.no_grad():
        for key, stock in keys.items():
            own[key].copy_(start[stock].to(own[key].device, own[key].dtype))


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter ``name`` (from ``named_parameters()``, any wrapper prefix) belongs to an adapter."""
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def mark_trainable(net: nn.Module, train: Sequence[str] = (r"seg_layers",)) -> None:
    """Freeze everything except the adapters and parameters whose name matches a ``train`` regex."""
    for name, p in net.named_parameters():
        p.requires_grad_(is_adapter_parameter(name) or any(re.search(t, name) for t in train))


def report(net: nn.Module) -> LoRAReport:
    """Unique-parameter counts: all, trainable, adapter (lora_A / lora_B)."""
    total = trainable = adapter = 0
    for name, p in net.named_parameters():  # named_parameters() de-duplicates shared parameters
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        adapter += p.numel() if is_adapter_parameter(name) else 0
    return LoRAReport(total, trainable, adapter, [n for n, _ in lora_layers(net)])


def has_lora_keys(keys: Iterable[str]) -> bool:
    return any(".lora_A." in k or ".base_layer." in k for k in keys)
