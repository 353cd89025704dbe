"""Every nnU-Net trainer nnunet_ext ships (installed as ``nnunet_ext.trainers``).

One class per file, named after the file, as in nnU-Net. Add a new trainer by importing it here and
listing it in ``TRAINERS``; its ``_smoke`` and ``_demo`` schedule variants are then created too (see
:mod:`nnunet_ext.schedules`), and ``nnUNetv2_train -tr`` finds all of them through ``nnUNet_extTrainer``.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.schedules import add_schedule_variants
from nnunet_ext.trainers.nnUNetTrainerBANet import nnUNetTrainerBANet
from nnunet_ext.trainers.nnUNetTrainerBANet_4fold import nnUNetTrainerBANet_4fold

# The method trainers. The plain nnUNetTrainer is listed only to get its short-schedule variants (the
# baseline that demos and benchmarks compare against); nnU-Net itself provides the class.
TRAINERS: list[type] = [nnUNetTrainerBANet, nnUNetTrainerBANet_4fold]

__all__ = [t.__name__ for t in TRAINERS]
__all__ += add_schedule_variants(globals(), [nnUNetTrainer, *TRAINERS], __name__)
