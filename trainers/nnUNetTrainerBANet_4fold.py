"""BA-Net with the KiPA22 recipe's 4-fold cross-validation (sklearn KFold, shuffle, seed 12345)."""

from __future__ import annotations

from nnunet_ext.core.splits import KFoldSplit
from nnunet_ext.trainers.nnUNetTrainerBANet import nnUNetTrainerBANet


class nnUNetTrainerBANet_4fold(KFoldSplit, nnUNetTrainerBANet):
    """:class:`nnUNetTrainerBANet` on a 4-fold split: folds 0..3 (or 'all').

    The split is written to the dataset's ``splits_final.json`` (nnU-Net's file and format) if that file does not
    exist yet, so other trainers of the dataset (e.g. the ResEnc nnU-Net the KiPA entry was ensembled with) use
    the same folds. An existing file with another number of folds is an error (see
    :func:`nnunet_ext.core.splits.kfold_do_split`).
    """

    num_folds: int = 4
    split_seed: int = 12345
