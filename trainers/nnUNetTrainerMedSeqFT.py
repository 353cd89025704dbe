"""nnUNetTrainerMedSeqFT: K&G RFT (knowledge and generalisation retention fine-tuning) of MedSeqFT.

    nnunet-ext medseqft select DATASET CONFIG --checkpoint M0.pth [-f FOLD]   # MDS buffer of task t
    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerMedSeqFT -pretrained_weights M_{t-1}.pth

The recipe (docs/medseqft.md lists which parts the paper text we could read pins down and which not):

1. **Expert** (``expert = "fft"``, default): full fine-tuning of M_{t-1} on task t gives M_t^FFT
   (``nnUNetTrainerMedSeqFTExpert``, same schedule, its own result folder next to this trainer's). An expert
   already there (``checkpoint_final.pth``) is reused; otherwise this trainer trains it first, in this process,
   from exactly the weights ``-pretrained_weights`` loaded (the body of M_{t-1}; a new head).
2. **Student**: LoRA adapters on M_{t-1} (nnUNetTrainerLoRA: adapters + the head trained, base frozen; the head
   starts from the expert's head, ``expert_head_init``) learn task t from the expert while keeping the
   teacher's knowledge on the MDS buffer. ONE forward pass of the student over ``[task batch; buffer batch]``
   (one DDP reduction, one compiled graph) and

       loss = seg_weight    * nnU-Net Dice+CE(task batch)
            + expert_weight * KD(student, M_t^FFT; task batch)       (expert_distill: features / logits / both)
            + kd_weight     * KD(student, teacher(s); buffer batch)  (retention)

3. **Merge**: the adapters are merged at the end; M_t (``checkpoint_final.pth``) is a stock nnU-Net checkpoint.

``expert = None`` (``nnUNetTrainerMedSeqFTNoExpert``) is the earlier variant: no expert, the student learns task
t from the labels alone (segmentation + retention terms).

* ``teacher`` (retention): ``"previous"`` (default) M_{t-1}, the frozen base of this very network;
  ``"foundation"``: M_0 (the buffer's checkpoint); ``"both"``: both, weighted by ``teacher_weights``
  (previous, foundation). With two different targets the retention loss cannot reach zero from task 2 on.
* ``distill`` (retention): ``"features"`` (default): MSE between the student's and the teacher's feature maps of
  every encoder and decoder stage (``kd_normalise``: each stage's MSE divided by the teacher's feature
  variance); ``"logits"``: KL to the teacher's output through the teacher's frozen head (``teacher =
  "foundation"`` only: nnU-Net never loads M_{t-1}'s head).
* ``kd_batch_size`` (1): buffer patches per step (the student's activations grow with task + buffer patches).
* every epoch (``log_gradient_norms``) the log shows each weighted term's gradient norm on the adapters,
  measured on the first batch of the epoch in a separate pass through the unwrapped network (no DDP hook,
  no compiled graph involved; this rank's batch).
* the buffer batch: random patches of buffer cases with nnU-Net's validation transforms (no augmentation, no
  deep-supervision targets) through nnU-Net's augmenter machinery (background workers when
  ``nnUNet_n_proc_DA`` > 0). Buffer cases must be training cases of this fold (checked).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_ext.core import lora
from nnunet_ext.core.train_step import autocast_for, batch_to_device, optimizer_step, uncompiled, unwrap
from nnunet_ext.medseqft.method import (
    FeatureTap,
    feature_mse,
    load_buffer,
    load_checkpoint_network,
    logit_distillation,
    unet_features,
)
from nnunet_ext.trainers.nnUNetTrainerLoRA import nnUNetTrainerLoRA

TERMS = ("segmentation", "expert", "retention")


class nnUNetTrainerMedSeqFT(nnUNetTrainerLoRA):
    expert: str | None = "fft"  # "fft": full fine-tuning expert M_t^FFT; None: no expert stage
    expert_trainer: str = "nnUNetTrainerMedSeqFTExpert"  # (+ this trainer's schedule suffix, e.g. _smoke)
    expert_distill: str = "both"  # "features" | "logits" | "both"
    expert_weight: float = 1.0
    expert_head_init: bool = True
    seg_weight: float = 1.0
    teacher: str = "previous"  # "previous" | "foundation" | "both"
    teacher_weights: tuple[float, float] = (0.5, 0.5)  # (previous, foundation) for teacher = "both"
    distill: str = "features"  # "features" | "logits"
    kd_weight: float = 1.0
    kd_normalise: bool = False
    kd_temperature: float = 2.0
    kd_batch_size: int | None = 1  # None: the training batch size
    log_gradient_norms: bool = True
    needs_mds_buffer: bool = True  # read by tests/tools: run `nnunet-ext medseqft select` first

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.teacher not in ("previous", "foundation", "both"):
            raise ValueError(f"teacher must be previous, foundation or both, not {self.teacher!r}")
        if self.distill not in ("features", "logits"):
            raise ValueError(f"distill must be features or logits, not {self.distill!r}")
        if self.distill == "logits" and self.teacher != "foundation":
            raise ValueError("logit distillation needs the teacher's head: use teacher = 'foundation'")
        if self.expert not in (None, "fft"):
            raise ValueError(f"expert must be 'fft' or None, not {self.expert!r}")
        if self.expert_distill not in ("features", "logits", "both"):
            raise ValueError(f"expert_distill must be features, logits or both, not {self.expert_distill!r}")
        if len(self.teacher_weights) != 2 or min(self.teacher_weights) < 0 or sum(self.teacher_weights) <= 0:
            raise ValueError(f"teacher_weights must be two weights >= 0, not {self.teacher_weights!r}")
        self.teachers: list[nn.Module] = []
        self.teacher_mix: list[float] = []
        self.expert_network: nn.Module | None = None
        self.buffer_record: dict | None = None
        self.dataloader_buffer = None
        self.epoch_step = 0

    def base_network(self) -> nn.Module:
        net = unwrap(self.network)
        return net.net if isinstance(net, FeatureTap) else net

    def training_module(self, base: nn.Module) -> nn.Module:
        return FeatureTap(base)

    # ------------------------------------------------------------------ expert M_t^FFT
    def expert_trainer_name(self) -> str:
        from nnunet_ext.core.schedules import SCHEDULES

        name = type(self).__name__
        suffix = next((f"_{s}" for s in SCHEDULES if name.endswith(f"_{s}")), "")
        return self.expert_trainer + suffix

    def expert_checkpoint(self) -> Path:
        """``<nnUNet_results>/<dataset>/<expert trainer>__<plans>__<configuration>/fold_<fold>/checkpoint_final.pth``:
        next to this trainer's own result folder."""
        own = Path(self.output_folder_base)
        name = f"{self.expert_trainer_name()}__{self.plans_manager.plans_name}__{self.configuration_name}"
        return own.parent / name / f"fold_{self.fold}" / "checkpoint_final.pth"

    def train_expert(self) -> nn.Module:
        """Full fine-tuning of M_{t-1} (the weights -pretrained_weights loaded, body only: nnU-Net never loads the
        head) on this task, with this trainer's schedule; returns the trained (stock) network."""
        from nnunet_ext.core.nnunet_commands import find_trainer

        init = self.my_init_kwargs
        cls = find_trainer(self.expert_trainer_name())
        plans = {**copy.deepcopy(init["plans"]), "continue_training": False}  # nnU-Net 2.8 pops this key
        expert = cls(plans, init["configuration"], init["fold"], init["dataset_json"], self.device)
        for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every"):
            setattr(expert, key, getattr(self, key))
        expert.disable_checkpointing = self.disable_checkpointing
        expert.initialize()
        body = {k: v for k, v in self.base_network().state_dict().items() if ".seg_layers." not in k}
        missing, unexpected = unwrap(expert.network).load_state_dict(body, strict=False)
        if unexpected or any(".seg_layers." not in k for k in missing):
            raise RuntimeError(f"the expert's network differs from this one ({unexpected[:3]} {missing[:3]})")
        self.print_to_log_file(f"MedSeqFT: training the full fine-tuning expert M_t^FFT ({cls.__name__})")
        expert.run_training()
        return copy.deepcopy(unwrap(expert.network))

    def prepare_expert(self) -> None:
        """Before the adapters go in: the expert (reused or trained) and, on a fresh start, its head for the
        student."""
        path = self.expert_checkpoint()
        if path.is_file():
            network = load_checkpoint_network(path, self.device)["network"]
            self.print_to_log_file(f"MedSeqFT: expert M_t^FFT from {path}")
        elif self.lora_injected:  # resumed student: the expert it distilled must still be there
            raise RuntimeError(
                f"the MedSeqFT expert {path} is missing: the student being resumed distils it. Restore it, or "
                f"start this training again without --c (the expert is then trained first)"
            )
        else:
            network = self.train_expert()
        network.to(self.device).eval()
        network.decoder.deep_supervision = False
        network.requires_grad_(False)
        if self.expert_head_init and not self.lora_injected:
            head = {k: v for k, v in network.state_dict().items() if ".seg_layers." in k}
            self.base_network().load_state_dict(head, strict=False)
        self.expert_network = network

    # ------------------------------------------------------------------ teachers and buffer
    def build_teachers(self) -> None:
        base = self.base_network()
        teachers, mix = [], []
        w_prev, w_found = self.teacher_weights if self.teacher == "both" else (1.0, 1.0)
        if self.teacher in ("previous", "both"):
            # M_{t-1} as the adapters went in (head: the expert's with expert_head_init), also after --c
            teachers.append(lora.strip_lora(copy.deepcopy(base)))
            teachers[-1].load_state_dict(self.lora_start)
            mix.append(float(w_prev))
        if self.teacher in ("foundation", "both"):
            m0 = load_checkpoint_network(self.buffer_record["checkpoint"], self.device)["network"]
            body = {k: v for k, v in m0.state_dict().items() if ".seg_layers." not in k}
            same = teachers and all(
                k in teachers[0].state_dict() and torch.equal(v, teachers[0].state_dict()[k].to(v.device))
                for k, v in body.items()
            )
            if same:  # task 1: M_{t-1} is M_0, one teacher
                mix = [1.0]
            else:
                teachers.append(m0)
                mix.append(float(w_found))
        for t in teachers:
            t.to(self.device).eval()
            t.decoder.deep_supervision = False
            t.requires_grad_(False)
        self.teachers = teachers
        self.teacher_mix = [m / sum(mix) for m in mix]
        expert = (
            "no expert"
            if self.expert is None
            else f"expert M_t^FFT ({self.expert_distill}, x {self.expert_weight})"
        )
        self.print_to_log_file(
            f"MedSeqFT: {expert}; {len(teachers)} retention teacher(s) ({self.teacher}, weights "
            f"{[round(m, 3) for m in self.teacher_mix]}), {self.distill} distillation"
            f"{' (normalised by teacher variance)' if self.kd_normalise else ''}, kd_weight {self.kd_weight}, "
            f"buffer {len(self.buffer_record['buffer'])} cases ({self.buffer_record['score']} score), "
            f"{self.kd_batch_size or self.batch_size} buffer patch(es) per step"
        )

    def get_buffer_dataloader(self):
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        keys = list(self.buffer_record["buffer"])
        train_keys, _ = self.do_split()
        outside = [k for k in keys if k not in set(train_keys)]
        if outside:
            raise RuntimeError(
                f"buffer cases {outside} are not training cases of fold {self.fold} (validation cases or not "
                f"preprocessed): re-run `nnunet-ext medseqft select ... -f {self.fold} --overwrite`"
            )
        dataset = self.dataset_class(
            self.preprocessed_dataset_folder,
            keys,
            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage,
        )
        transforms = self.get_validation_transforms(  # no deep-supervision targets: labels are never used
            None,
            is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label,
        )
        patch = self.configuration_manager.patch_size
        loader = nnUNetDataLoader(
            dataset,
            self.kd_batch_size or self.batch_size,
            patch,
            patch,
            self.label_manager,
            oversample_foreground_percent=0.0,
            sampling_probabilities=None,
            pad_sides=None,
            transforms=transforms,
        )
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(
            data_loader=loader,
            transform=None,
            num_processes=max(1, processes // 4),
            num_cached=max(2, processes // 4),
            seeds=None,
            pin_memory=self.device.type == "cuda",
            wait_time=0.002,
        )

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.buffer_record = load_buffer(self.preprocessed_dataset_folder_base)
        if self.expert is not None:
            self.prepare_expert()  # before the adapters go in (the expert starts from the same M_{t-1})
        super().on_train_start()  # LoRA injection (after the pretrained weights), nnU-Net's loaders
        self.build_teachers()
        self.dataloader_buffer = self.get_buffer_dataloader()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.epoch_step = 0

    # ------------------------------------------------------------------ loss
    def distillation_loss(self, student_feats: list[torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
        """Retention: the student's features on the buffer batch against the teacher(s)' (weighted)."""
        losses = []
        for teacher in self.teachers:
            with torch.no_grad():
                t_out, t_feats = unet_features(teacher, buffer)
            if self.distill == "features":
                losses.append(feature_mse(student_feats, t_feats, self.kd_normalise))
            else:
                s_logits = teacher.decoder.seg_layers[-1](student_feats[-1])
                losses.append(
                    logit_distillation(s_logits, t_out, self.kd_temperature, self.label_manager.has_regions)
                )
        return sum(m * loss for m, loss in zip(self.teacher_mix, losses))

    def expert_loss(
        self, student_feats: list[torch.Tensor], student_logits: torch.Tensor, data: torch.Tensor
    ) -> torch.Tensor:
        """The student learns task t from M_t^FFT on the task batch."""
        with torch.no_grad():
            e_logits, e_feats = unet_features(self.expert_network, data)
        parts = []
        if self.expert_distill in ("features", "both"):
            parts.append(feature_mse(student_feats, e_feats, self.kd_normalise))
        if self.expert_distill in ("logits", "both"):
            parts.append(
                logit_distillation(
                    student_logits, e_logits, self.kd_temperature, self.label_manager.has_regions
                )
            )
        return sum(parts)

    def loss_terms(
        self, module: nn.Module, data, target, buffer, seg_loss: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss terms of one step; ``seg_loss``: the segmentation loss (default nnU-Net's
        ``self.loss``, compiled where nnU-Net compiles it)."""
        n = data.shape[0]
        output, feats = module(torch.cat((data, buffer)), features=True)
        deep = isinstance(output, (list, tuple))
        seg_loss = self.loss if seg_loss is None else seg_loss
        terms = {"segmentation": seg_loss([o[:n] for o in output] if deep else output[:n], target)}
        if self.expert_network is not None:
            logits = output[0][:n] if deep else output[:n]
            terms["expert"] = self.expert_loss([f[:n] for f in feats], logits, data)
        terms["retention"] = self.distillation_loss([f[n:] for f in feats], buffer)
        return terms

    def term_weights(self) -> dict[str, float]:
        return {"segmentation": self.seg_weight, "expert": self.expert_weight, "retention": self.kd_weight}

    def gradient_norms(self, data, target, buffer) -> dict[str, float]:
        """Each weighted term's gradient norm on the adapters, from a separate pass through the UNWRAPPED network
        and the uncompiled segmentation loss (DDP's hooks and the compiled graphs are not touched: a compiled
        backward cannot be run twice, as the per-term gradients need; no optimizer state changes)."""
        module = unwrap(self.network)
        seg_loss = uncompiled(self.loss)
        params = [p for n, p in module.named_parameters() if p.requires_grad and lora.is_adapter_parameter(n)]
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        weights = self.term_weights()
        with autocast_for(self):
            terms = self.loss_terms(module, data, target, buffer, seg_loss)
        norms = {}
        names = list(terms)
        for i, name in enumerate(names):
            grads = torch.autograd.grad(
                terms[name] * (weights[name] * scale),
                params,
                retain_graph=i < len(names) - 1,
                allow_unused=True,
            )
            squares = [g.float().div(scale).square().sum() for g in grads if g is not None]
            norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        return norms

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(self, batch)
        buffer = next(self.dataloader_buffer)["data"].to(self.device, non_blocking=True)
        norms = {}
        if self.log_gradient_norms and self.epoch_step == 0:
            norms = self.gradient_norms(data, target, buffer)
        self.epoch_step += 1

        weights = self.term_weights()
        terms = {}

        def loss():
            terms.update(self.loss_terms(self.network, data, target, buffer))
            return sum(weights[name] * value for name, value in terms.items())

        out = optimizer_step(self, loss)
        for name, value in terms.items():
            out[f"{name}_loss"] = value.detach().cpu().numpy()
            out[f"{name}_grad"] = np.float64(norms.get(name, np.nan))
        return out

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)  # logs the total loss (averaged over ranks)
        # this rank's means, for reading the balance of the terms in the log
        mean = {
            k: float(np.mean([o[k] for o in train_outputs])) for k in train_outputs[0] if k.endswith("_loss")
        }
        parts = [f"segmentation loss {mean['segmentation_loss']:.4f}"]
        if "expert_loss" in mean:
            parts.append(
                f"expert distillation loss {mean['expert_loss']:.4g} (x expert_weight {self.expert_weight})"
            )
        parts.append(f"distillation loss {mean['retention_loss']:.4g} (x kd_weight {self.kd_weight})")
        self.print_to_log_file(", ".join(parts))
        grads = {
            k[: -len("_grad")]: float(np.nanmean([o[k] for o in train_outputs]))
            for k in train_outputs[0]
            if k.endswith("_grad") and not all(np.isnan(o[k]) for o in train_outputs)
        }
        if grads:
            self.print_to_log_file(
                "gradient norm on the adapters (weighted terms, first batch): "
                + ", ".join(f"{k} {v:.4g}" for k, v in grads.items())
            )

    def on_train_end(self):
        super().on_train_end()
        if self.dataloader_buffer is not None and hasattr(self.dataloader_buffer, "_finish"):
            self.dataloader_buffer._finish()
        self.teachers = []
        self.expert_network = None
        self.dataloader_buffer = None
