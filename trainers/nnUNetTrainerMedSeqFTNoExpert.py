"""nnUNetTrainerMedSeqFTNoExpert: MedSeqFT's K&G RFT without the full fine-tuning expert (the earlier variant).

    nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerMedSeqFTNoExpert -pretrained_weights M_{t-1}.pth

The LoRA student of M_{t-1} learns task t from the labels alone (segmentation loss) while distilling the
retention teacher(s) on the MDS buffer; no M_t^FFT is trained or distilled. Everything else is
``nnUNetTrainerMedSeqFT``'s (docs/medseqft.md).
"""

from __future__ import annotations

from nnunet_ext.trainers.nnUNetTrainerMedSeqFT import nnUNetTrainerMedSeqFT


class nnUNetTrainerMedSeqFTNoExpert(nnUNetTrainerMedSeqFT):
    expert = None
