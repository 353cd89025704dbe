"""Every nnU-Net trainer nnunet_ext ships (installed as ``nnunet_ext.trainers``).

One class per file, named after the file, as in nnU-Net. Add a new trainer by importing it here and
listing it in ``TRAINERS`` (and in ``METHOD_TRAINERS`` if it is a method's main trainer rather than a
recipe variant such as a different split); its ``_smoke`` and ``_demo`` schedule variants are then created
too (see :mod:`nnunet_ext.core.schedules`), and ``nnUNetv2_train -tr`` finds all of them through
``nnUNet_extTrainer``.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.core.schedules import add_schedule_variants
from nnunet_ext.trainers.nnUNetTrainerBANet import nnUNetTrainerBANet
from nnunet_ext.trainers.nnUNetTrainerBANet_4fold import nnUNetTrainerBANet_4fold
from nnunet_ext.trainers.nnUNetTrainerDoDNet import nnUNetTrainerDoDNet
from nnunet_ext.trainers.nnUNetTrainerLabelPropA import nnUNetTrainerLabelPropA
from nnunet_ext.trainers.nnUNetTrainerLabelPropB import nnUNetTrainerLabelPropB
from nnunet_ext.trainers.nnUNetTrainerLoRA import nnUNetTrainerLoRA
from nnunet_ext.trainers.nnUNetTrainerMedSeqFT import nnUNetTrainerMedSeqFT
from nnunet_ext.trainers.nnUNetTrainerMedSeqFTExpert import nnUNetTrainerMedSeqFTExpert
from nnunet_ext.trainers.nnUNetTrainerMedSeqFTNoExpert import nnUNetTrainerMedSeqFTNoExpert
from nnunet_ext.trainers.nnUNetTrainerTransDoDNet import nnUNetTrainerTransDoDNet
from nnunet_ext.trainers.nnUNetTrainerUniSeg import nnUNetTrainerUniSeg
from nnunet_ext.trainers.nnUNetTrainerUniSegFT import nnUNetTrainerUniSegFT

# One main trainer per method: what the demo and the benchmarks compare with plain nnUNetTrainer.
METHOD_TRAINERS: list[type] = [
    nnUNetTrainerBANet,
    nnUNetTrainerDoDNet,
    nnUNetTrainerTransDoDNet,
    nnUNetTrainerUniSeg,
]
# Everything we ship (methods and their recipe variants). The plain nnUNetTrainer is added below only to
# get its short-schedule variants (the baseline of demos and tests); nnU-Net itself provides the class.
TRAINERS: list[type] = [
    *METHOD_TRAINERS,
    nnUNetTrainerBANet_4fold,
    nnUNetTrainerLabelPropA,
    nnUNetTrainerLabelPropB,
    nnUNetTrainerUniSegFT,
    # fine-tune a pretrained checkpoint (-pretrained_weights), so not compared from scratch in demo/benchmarks
    nnUNetTrainerLoRA,
    nnUNetTrainerMedSeqFT,
    nnUNetTrainerMedSeqFTExpert,  # MedSeqFT's full fine-tuning expert M_t^FFT
    nnUNetTrainerMedSeqFTNoExpert,  # MedSeqFT without the expert stage
]

__all__ = [t.__name__ for t in TRAINERS]
__all__ += add_schedule_variants(globals(), [nnUNetTrainer, *TRAINERS], __name__)
