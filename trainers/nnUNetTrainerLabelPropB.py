"""Model B of the COSMOS22 label-propagation recipe: plain nnU-Net, 500 epochs, 4-fold cross-validation."""

from __future__ import annotations

from nnunet_ext.trainers.nnUNetTrainerLabelPropA import nnUNetTrainerLabelPropA


class nnUNetTrainerLabelPropB(nnUNetTrainerLabelPropA):
    """Plain :class:`nnUNetTrainer` on the recipe's long schedule: 500 epochs (x 250 iterations), the same
    4-fold split as :class:`nnUNetTrainerLabelPropA` (folds 0..3 or 'all'). Model B is trained on the
    pseudo-labels of model A. It is also the comparable baseline that trains directly on the sparse labels
    with nnU-Net's ignore label (``nnUNetv2_train SPARSE_ID CFG FOLD -tr nnUNetTrainerLabelPropB``)."""

    recipe_epochs: int = 500
