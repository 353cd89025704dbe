"""The one module nnU-Net imports from ``nnUNet_extTrainer`` (see ``nnunet-ext trainer-dir``).

nnU-Net imports every module of that folder as a top-level module. This module has a name nothing
else uses and only re-exports the trainer classes of :mod:`nnunet_ext.trainers`, so the class that
``nnUNetv2_train -tr X`` / ``nnUNetv2_predict -tr X`` find IS ``nnunet_ext.trainers.X`` (one class
object, not a second copy imported from another path).
"""

from nnunet_ext.trainers import *  # noqa: F401,F403
