"""nnUNetTrainerLoRA: fine-tune a pretrained nnU-Net with LoRA adapters (and the segmentation head) only.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerLoRA -pretrained_weights PRETRAINED.pth

Order of events (the base weights must be in the network BEFORE the adapters go in, because a network with
adapters has keys such as ``...conv.base_layer.weight`` that no stock checkpoint has):

1. ``initialize()`` builds the STOCK network exactly as nnUNetTrainer does (same class, same compile/DDP
   wrapping), so nnU-Net's ``load_pretrained_weights`` (``-pretrained_weights``, run by nnUNetv2_train
   right after ``initialize()``) loads into it unchanged;
2. ``on_train_start()`` injects the adapters into the (pretrained) network (:mod:`nnunet_ext.core.lora`), freezes
   everything except adapters + ``seg_layers``, then re-applies torch.compile and DDP and rebuilds the
   optimizer over the trainable parameters only. Without ``-pretrained_weights`` (weights still equal to
   the random initialisation) it stops with an error, unless ``requires_pretrained_weights = False``;
3. every checkpoint (latest / best / final) stores in ``network_weights`` the MERGED network under the stock
   key names, so ``nnUNetv2_predict -tr nnUNetTrainerLoRA`` and ``-pretrained_weights`` of a next training
   accept it as is. Only the adapters are stored beside it (``lora_state``, ``lora_format = "adapters"``,
   plus ``lora_config``), so the body is stored once per checkpoint. The network as the adapters went in
   (frozen base, starting heads) is written ONCE per training to ``lora_start.pth`` beside the checkpoints,
   which record its SHA-256; ``load_checkpoint`` (``--c``) re-injects the adapters and puts the frozen base
   back bit-exactly from that file, so a resumed run equals an uninterrupted one. Without the file (or with
   another training's) it rebuilds the base as ``W_merged - delta``
   (:func:`nnunet_ext.core.lora.load_merged_with_adapters`; float rounding, ~1e-7 relative), says so in the log and
   writes a new start file. Checkpoints of older versions (the whole unmerged state in ``lora_state``) still
   load;
4. ``on_train_end()`` merges the adapters into the network, so nnU-Net's final validation runs the
   stock (merged) network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_ext.core import lora
from nnunet_ext.core.io import atomic_torch_save
from nnunet_ext.core.schedules import PolyLRScheduler
from nnunet_ext.core.train_step import unwrap

START_FILE = "lora_start.pth"


class nnUNetTrainerLoRA(nnUNetTrainer):
    # --- LoRA choices (class attributes: identical on every DDP rank; subclass to change) ---
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    # regexes searched in canonical module names (e.g. encoder.stages.3.0.convs.1.conv); every conv and
    # transposed conv of encoder and decoder by default; the heads are trained fully instead
    lora_target: tuple[str, ...] = (r"^encoder\.", r"^decoder\.")
    lora_exclude: tuple[str, ...] = (r"seg_layers",)
    # parameters trained besides the adapters (regexes on parameter names)
    lora_train_also: tuple[str, ...] = (r"seg_layers",)
    # learning rate of the adapters (None: nnU-Net's initial_lr, as the other trainable parameters get);
    # both decay with nnU-Net's poly schedule
    lora_lr: float | None = None
    # fine-tuning only makes sense from pretrained weights (-pretrained_weights FILE)
    requires_pretrained_weights: bool = True
    needs_pretrained_weights: bool = True  # read by tests/tools that drive nnUNetv2_train

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lora_injected = False
        self._random_init_fingerprint = None
        self.lora_start: dict[str, torch.Tensor] | None = None  # see set_start_state
        self.lora_start_sha256: str | None = None

    # ------------------------------------------------------------------ configuration
    def lora_config(self) -> lora.LoRAConfig:
        return lora.LoRAConfig(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target=tuple(self.lora_target),
            exclude=tuple(self.lora_exclude),
        )

    def base_network(self) -> nn.Module:
        """The plain network (inside DDP / torch.compile and any training wrapper)."""
        return unwrap(self.network)

    @staticmethod
    def _fingerprint(net: nn.Module) -> torch.Tensor:
        return torch.stack([p.detach().float().abs().sum() for p in net.parameters()]).cpu()

    def initialize(self):
        super().initialize()
        self._random_init_fingerprint = self._fingerprint(self.base_network())

    def configure_optimizers(self):
        """nnU-Net's SGD over the trainable parameters only: the adapters at ``lora_lr`` (first group: the lr
        nnU-Net logs), everything else trainable (the heads) at ``initial_lr``; poly decay of both."""
        adapters, others = [], []
        for name, p in self.network.named_parameters():
            if p.requires_grad:
                (adapters if lora.is_adapter_parameter(name) else others).append(p)
        lora_lr = self.initial_lr if self.lora_lr is None else float(self.lora_lr)
        groups = [g for g in ({"params": adapters, "lr": lora_lr}, {"params": others}) if g["params"]]
        optimizer = torch.optim.SGD(
            groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.num_epochs)

    # ------------------------------------------------------------------ injection
    def before_injection(self, base: nn.Module) -> None:
        """Hook: runs on the pretrained stock network just before the adapters go in (MedSeqFT: teachers)."""

    def training_module(self, base: nn.Module) -> nn.Module:
        """Hook: the module trained (compiled, DDP-wrapped); default the adapted network itself."""
        return base

    def inject_adapters(self, check_pretrained: bool = True) -> None:
        if self.lora_injected:
            return
        base = self.base_network()
        if check_pretrained and self.requires_pretrained_weights:
            if torch.equal(self._fingerprint(base), self._random_init_fingerprint):
                raise RuntimeError(
                    f"{self.__class__.__name__} fine-tunes a pretrained network with LoRA, but the network still "
                    f"has its random initialisation. Pass the pretrained checkpoint: nnUNetv2_train ... -tr "
                    f"{self.__class__.__name__} -pretrained_weights /path/to/checkpoint_final.pth"
                )
        self.before_injection(base)
        fresh = check_pretrained  # False: load_checkpoint (--c) injects, then restores the start state itself
        names = lora.inject_lora(base, self.lora_config())
        lora.mark_trainable(base, self.lora_train_also)
        base.to(self.device)
        self.print_to_log_file(str(lora.report(base)))
        self.print_to_log_file(f"LoRA layers: {names}", also_print_to_console=False)
        module = self.training_module(base)
        if self._do_i_compile():
            module = torch.compile(module)
        self.network = module
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            self.network = DDP(self.network, device_ids=[self.local_rank])
        self.lora_injected = True
        if fresh:
            self.set_start_state(lora.start_state(base))

    # ------------------------------------------------------------------ the start state (exact --c resume)
    def start_state_file(self) -> Path:
        return Path(self.output_folder) / START_FILE

    def set_start_state(self, state: dict[str, torch.Tensor]) -> None:
        """The network as the adapters went in (stock keys): the frozen base, bit-exact. Rank 0 writes it
        once per training to ``lora_start.pth`` beside the checkpoints, which record its digest, so ``--c``
        puts the base back exactly instead of rebuilding it as ``W_merged - delta``."""
        self.lora_start = state
        self.lora_start_sha256 = lora.state_digest(state)
        if self.local_rank == 0 and not self.disable_checkpointing:
            atomic_torch_save(self.start_state_file(), {"state": state, "sha256": self.lora_start_sha256})

    def read_start_state(self, sha256: str | None) -> dict[str, torch.Tensor] | None:
        """The start state of the training a checkpoint belongs to, or None (file missing or another one)."""
        path = self.start_state_file()
        if sha256 is None or not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("sha256") != sha256 or lora.state_digest(saved["state"]) != sha256:
            return None
        return saved["state"]

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.inject_adapters()
        super().on_train_start()

    def set_deep_supervision_enabled(self, enabled: bool):
        self.base_network().decoder.deep_supervision = enabled

    def plot_network_architecture(self):
        pass  # hiddenlayer cannot trace peft layers; the LoRA report is in the log instead

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or not self.lora_injected:
            return super().save_checkpoint(filename)
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        base = self.base_network()
        checkpoint = {
            "network_weights": lora.merged_state_dict(base),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            # the body once: the merged weights above + the adapters; resume rebuilds the frozen base as
            # W_merged - delta (lora.load_merged_with_adapters)
            "lora_state": lora.adapter_state_dict(base),
            "lora_format": "adapters",
            "lora_config": self.lora_config().to_dict(),
            # the frozen base bit-exactly for --c: lora_start.pth in this folder, identified by its digest
            "lora_start_sha256": self.lora_start_sha256,
        }
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        weights = checkpoint["network_weights"]
        adapters = None
        if "lora_state" in checkpoint:  # resume: adapters back in, then their unmerged state
            self.inject_adapters(check_pretrained=False)
            if checkpoint.get("lora_format") == "adapters":
                adapters = checkpoint["lora_state"]
            else:  # older checkpoints: the whole unmerged network
                weights = checkpoint["lora_state"]
        weights = {k[7:] if k.startswith("module.") else k: v for k, v in weights.items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes
        )
        if adapters is not None:
            base = self.base_network()
            lora.load_merged_with_adapters(base, weights, adapters)
            start = self.read_start_state(checkpoint.get("lora_start_sha256"))
            if start is not None:
                lora.load_exact_base(base, start)
                self.lora_start, self.lora_start_sha256 = start, checkpoint["lora_start_sha256"]
            else:
                self.print_to_log_file(
                    f"WARNING: {self.start_state_file()} is missing or belongs to another training: the frozen "
                    f"base weights are rebuilt as W_merged - delta (float rounding, ~1e-7 relative), so this "
                    f"resumed run is close to, not bitwise equal to, an uninterrupted one"
                )
                self.set_start_state(lora.start_state(base))
        else:
            self.base_network().load_state_dict(weights)
        if self.lora_injected == ("lora_state" in checkpoint):  # optimizer over the same parameter set
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def on_train_end(self):
        super().on_train_end()  # writes checkpoint_final.pth (merged weights + lora_state)
        self.lora_start = None  # on disk (lora_start.pth)
        if self.lora_injected:  # validation and anything after runs the merged, stock network
            base = lora.merge_lora(self.base_network())
            for p in base.parameters():
                p.requires_grad_(True)
            self.network = base
            self.lora_injected = False
