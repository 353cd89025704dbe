"""nnUNetTrainerMedSeqFTExpert: the full fine-tuning expert M_t^FFT of MedSeqFT's K&G RFT.

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerMedSeqFTExpert -pretrained_weights M_{t-1}.pth

Plain nnU-Net full fine-tuning (nnUNetTrainer, every parameter trained) of M_{t-1} on task t. Its own trainer
name keeps the expert apart from any other nnUNetTrainer model of the dataset: ``nnUNetTrainerMedSeqFT`` finds
it next to its own result folder (``nnUNetTrainerMedSeqFTExpert[_smoke|_demo|_converge]__PLANS__CONFIG/fold_F``) and
trains it there itself when it is missing. Without ``-pretrained_weights`` it stops (an expert from random
weights is not M_{t-1} fine-tuned).
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerMedSeqFTExpert(nnUNetTrainer):
    needs_pretrained_weights: bool = True  # read by tests/tools that drive nnUNetv2_train

    def initialize(self):
        super().initialize()
        self._random_init_fingerprint = self._fingerprint()

    def _fingerprint(self) -> torch.Tensor:
        from nnunet_ext.core.train_step import unwrap

        net = unwrap(self.network)
        return torch.stack([p.detach().float().abs().sum() for p in net.parameters()]).cpu()

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0 and torch.equal(self._fingerprint(), self._random_init_fingerprint):
            raise RuntimeError(
                f"{type(self).__name__} fine-tunes M_(t-1) fully, but the network still has its random "
                f"initialisation. Pass the previous model: nnUNetv2_train ... -tr {type(self).__name__} "
                f"-pretrained_weights /path/to/checkpoint_final.pth"
            )
        super().on_train_start()
