"""nnUNetTrainerMedSeqFT: K&G RFT (knowledge and generalisation retention fine-tuning) of MedSeqFT.

    nnunet-ext medseqft select DATASET CONFIG --checkpoint M0.pth        # MDS buffer of task t
    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerMedSeqFT -pretrained_weights M_{t-1}.pth

Adapts M_{t-1} (the ``-pretrained_weights``) to task t with LoRA (nnUNetTrainerLoRA: adapters + new
segmentation head trained, base frozen, merged into M_t at the end) while distilling the knowledge of the
teacher(s) on the MDS buffer: each training step runs ONE forward pass of the student over
``[task batch; buffer batch]`` and minimises

    loss = nnU-Net Dice+CE(task batch) + kd_weight * KD(student, teacher(s); buffer batch)

The buffer (``nnUNet_preprocessed/DatasetX/medseqft_buffer.json``, written by ``nnunet-ext medseqft
select``) also names the foundation model M_0. MedSeqFT has no released code; the choices below are the
paper summaries' (feature-level LoRA-based distillation) made explicit and configurable by subclassing:

* ``teacher``: ``"both"`` (default) M_{t-1} AND M_0; ``"previous"``: M_{t-1} only (the frozen base weights
  of this very network with the adapters removed: no extra checkpoint needed); ``"foundation"``: M_0
  only. When M_{t-1} and M_0 have the same body (task 1) one teacher is used.
* ``distill``: ``"features"`` (default): mean squared error between the student's and the teacher's feature
  maps of every encoder and decoder stage (instance-normalised activations, so no rescaling); ``"logits"``:
  KL divergence (temperature ``kd_temperature``) between the teacher's output and the teacher's (frozen)
  head applied to the student's last decoder features; needs the teacher's head, so only with
  ``teacher = "foundation"`` (nnU-Net's ``-pretrained_weights`` never loads ``seg_layers``).
* ``kd_weight`` (1.0), ``kd_batch_size`` (None: the training batch size); LoRA rank/alpha/layers are
  nnUNetTrainerLoRA's attributes (rank 4, alpha 8, every conv of encoder and decoder).
* the buffer batch is a random patch of a buffer case with nnU-Net's validation transforms (no
  augmentation); buffer cases may be from any fold: their labels are never used.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from nnunet_ext import lora
from nnunet_ext.medseqft import FeatureTap, load_buffer, load_checkpoint_network, unet_features
from nnunet_ext.trainers.nnUNetTrainerLoRA import nnUNetTrainerLoRA
from nnunet_ext.training import backward_and_step


class nnUNetTrainerMedSeqFT(nnUNetTrainerLoRA):
    teacher: str = "both"  # "previous" | "foundation" | "both"
    distill: str = "features"  # "features" | "logits"
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    kd_batch_size: int | None = None
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
        self.teachers: list[nn.Module] = []
        self.buffer_record: dict | None = None
        self.dataloader_buffer = None

    def base_network(self) -> nn.Module:
        net = lora.unwrap(self.network)
        return net.net if isinstance(net, FeatureTap) else net

    def training_module(self, base: nn.Module) -> nn.Module:
        return FeatureTap(base)

    # ------------------------------------------------------------------ teachers and buffer
    def build_teachers(self) -> None:
        base = self.base_network()
        teachers = []
        if self.teacher in ("previous", "both"):
            teachers.append(lora.strip_lora(copy.deepcopy(base)))
        if self.teacher in ("foundation", "both"):
            m0 = load_checkpoint_network(self.buffer_record["checkpoint"], self.device)["network"]
            body = {k: v for k, v in m0.state_dict().items() if ".seg_layers." not in k}
            same = teachers and all(
                k in teachers[0].state_dict() and torch.equal(v, teachers[0].state_dict()[k].to(v.device))
                for k, v in body.items()
            )
            if not same:
                teachers.append(m0)
        for t in teachers:
            t.to(self.device).eval()
            t.decoder.deep_supervision = False
            for p in t.parameters():
                p.requires_grad_(False)
        self.teachers = teachers
        self.print_to_log_file(
            f"MedSeqFT: {len(teachers)} teacher(s) ({self.teacher}), {self.distill} distillation, "
            f"kd_weight {self.kd_weight}, buffer {len(self.buffer_record['buffer'])} cases "
            f"({self.buffer_record['score']} score)"
        )

    def get_buffer_dataloader(self):
        keys = list(self.buffer_record["buffer"])
        available = set(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        missing = [k for k in keys if k not in available]
        if missing:
            raise RuntimeError(
                f"buffer cases {missing} are not in {self.preprocessed_dataset_folder}; re-run `nnunet-ext "
                f"medseqft select` for this dataset and configuration"
            )
        dataset = self.dataset_class(
            self.preprocessed_dataset_folder,
            keys,
            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage,
        )
        transforms = self.get_validation_transforms(
            self._get_deep_supervision_scales(),
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
        return SingleThreadedAugmenter(loader, None)

    def on_train_start(self):
        self.buffer_record = load_buffer(self.preprocessed_dataset_folder_base)
        super().on_train_start()  # LoRA injection (after the pretrained weights), nnU-Net's loaders
        self.build_teachers()
        self.dataloader_buffer = self.get_buffer_dataloader()

    # ------------------------------------------------------------------ loss
    def distillation_loss(self, student_feats: list[torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
        losses = []
        for teacher in self.teachers:
            with torch.no_grad():
                t_out, t_feats = unet_features(teacher, buffer)
            if self.distill == "features":
                if [f.shape for f in t_feats] != [f.shape for f in student_feats]:
                    raise RuntimeError(
                        "teacher and student feature maps differ in shape: the foundation checkpoint does not "
                        "have this network's architecture (use the same plans for every task)"
                    )
                losses.append(
                    torch.stack(
                        [F.mse_loss(s.float(), t.float()) for s, t in zip(student_feats, t_feats)]
                    ).mean()
                )
            else:
                temp = self.kd_temperature
                s_logits = teacher.decoder.seg_layers[-1](student_feats[-1])
                losses.append(
                    F.kl_div(
                        F.log_softmax(s_logits.float() / temp, 1),
                        F.softmax(t_out.float() / temp, 1),
                        reduction="batchmean",
                    )
                    * temp**2
                    / float(np.prod(s_logits.shape[2:]))
                )
        return torch.stack(losses).mean()

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [i.to(self.device, non_blocking=True) for i in target]
        else:
            target = target.to(self.device, non_blocking=True)
        buffer = next(self.dataloader_buffer)["data"].to(self.device, non_blocking=True)
        n = data.shape[0]

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output, feats = self.network(torch.cat((data, buffer)), features=True)
            output = [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]
            seg_loss = self.loss(output, target)
            kd_loss = self.distillation_loss([f[n:] for f in feats], buffer)
            loss = seg_loss + self.kd_weight * kd_loss

        backward_and_step(self, loss, 12)
        return {
            "loss": loss.detach().cpu().numpy(),
            "seg_loss": seg_loss.detach().cpu().numpy(),
            "kd_loss": kd_loss.detach().cpu().numpy(),
        }

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)  # logs the total loss (averaged over ranks)
        seg = float(np.mean([o["seg_loss"] for o in train_outputs]))
        kd = float(np.mean([o["kd_loss"] for o in train_outputs]))
        # this rank's means, for reading the balance of the two terms (kd_weight) in the log
        self.print_to_log_file(
            f"segmentation loss {seg:.4f}, distillation loss {kd:.4g} (x kd_weight {self.kd_weight})"
        )

    def on_train_end(self):
        super().on_train_end()
        self.teachers = []
        self.dataloader_buffer = None
