"""TransDoDNet (Xie et al., TMI 2023) as an nnU-Net v2 trainer: DoDNet's trainer with the transformer head
generator (:class:`nnunet_ext.architectures.transdodnet.TransDoDNet`) and the paper's optimisation: AdamW
(lr 2e-4, weight decay 1e-4), linear warm-up then nnU-Net's poly decay, gradient-norm clipping at 0.1.

``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerTransDoDNet``; see docs/dodnet.md.
"""

from __future__ import annotations

import torch

from nnunet_ext.architectures.transdodnet import TransDoDNet
from nnunet_ext.core.schedules import PolyLRScheduler
from nnunet_ext.trainers.nnUNetTrainerDoDNet import nnUNetTrainerDoDNet


class nnUNetTrainerTransDoDNet(nnUNetTrainerDoDNet):
    """DoDNet's trainer (partial-label loss, task registry, universal prediction) with TransDoDNet's network and
    the paper's AdamW / warm-up / clipping defaults. Change the class attributes in a subclass."""

    network_class_name = "nnunet_ext.architectures.transdodnet.TransDoDNet"
    network_class = TransDoDNet
    grad_clip: float = 0.1
    #: the paper: 10 warm-up epochs (of 1000); short schedules use at most a tenth of their epochs
    warmup_epochs: int = 10
    # transformer (the paper: 192-d, 8 heads, 3 feature levels, 3 encoder + 3 decoder layers)
    d_model: int = 192
    n_heads: int = 8
    n_levels: int = 3
    n_enc_layers: int = 3
    n_dec_layers: int = 3
    max_tokens_per_level: int = 1024
    #: TransDoDNet's ``add_memory = 2`` (its default): the bottleneck level's transformer memory (1x1 conv, norm,
    #: nonlinearity) is added to the CNN bottleneck that feeds the decoder; False: heads only
    add_memory: bool = True

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 2e-4
        self.weight_decay = 1e-4

    @classmethod
    def network_extra_kwargs(cls) -> dict:
        return {
            **super().network_extra_kwargs(),
            "d_model": cls.d_model,
            "n_heads": cls.n_heads,
            "n_levels": cls.n_levels,
            "n_enc_layers": cls.n_enc_layers,
            "n_dec_layers": cls.n_dec_layers,
            "max_tokens_per_level": cls.max_tokens_per_level,
            "add_memory": cls.add_memory,
        }

    def effective_warmup_epochs(self) -> int:
        return min(self.warmup_epochs, self.num_epochs // 10)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay
        )
        scheduler = PolyLRScheduler(optimizer, self.num_epochs, self.effective_warmup_epochs())
        return optimizer, scheduler
