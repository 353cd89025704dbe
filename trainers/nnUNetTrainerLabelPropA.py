"""Model A of the COSMOS22 label-propagation recipe: plain nnU-Net, 100 epochs, 4-fold cross-validation."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.core.splits import KFoldSplit


class nnUNetTrainerLabelPropA(KFoldSplit, nnUNetTrainer):
    """Plain :class:`nnUNetTrainer` (network, loss, augmentation unchanged) on the label-propagation recipe's
    short schedule: 100 epochs (x 250 iterations), folds 0..3 of a 4-fold split (sklearn KFold, shuffle,
    seed 12345; or 'all'). Model A is trained on the interpolated labels and its 4-fold ensemble writes the
    pseudo-labels (see docs/labelprop.md).

    The split is written to the dataset's ``splits_final.json`` if that file does not exist yet (see
    :func:`nnunet_ext.core.splits.kfold_do_split`); an existing file with another number of folds is an error.
    """

    num_folds: int = 4
    split_seed: int = 12345
    recipe_epochs: int = 100

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(
            plans, configuration, fold, dataset_json, device
        )  # checks the fold first (KFoldSplit)
        self.num_epochs = self.recipe_epochs
