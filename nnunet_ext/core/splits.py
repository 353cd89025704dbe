"""Fixed k-fold cross-validation splits in nnU-Net's format (``splits_final.json``).

nnU-Net's ``nnUNetTrainer.do_split`` reads ``<nnUNet_preprocessed>/<dataset>/splits_final.json`` if it exists and
otherwise writes a 5-fold split there (sklearn ``KFold(n_splits=5, shuffle=True, random_state=12345)`` over the
sorted case identifiers). Several published recipes use a different number of folds (BA-Net on KiPA22 and the
COSMOS label-propagation recipe: 4). :func:`kfold_do_split` writes such a split in the same format and place
and reads it back like ``nnUNetTrainer.do_split``. Because ``splits_final.json`` is
the dataset's split, every trainer on that dataset (e.g. a plain nnU-Net baseline that is later ensembled with
``nnUNetv2_find_best_configuration``) then uses the same folds.

Typical use in a trainer::

    def do_split(self):
        return kfold_do_split(self, n_splits=4, seed=12345)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_ext.core.errors import UserError

SPLITS_FILE_NAME = "splits_final.json"


def kfold_split(identifiers: Sequence[str], n_splits: int, seed: int = 12345) -> list[dict[str, list[str]]]:
    """``n_splits``-fold split of the SORTED identifiers, exactly as nnU-Net's ``do_split`` builds its default
    split (``generate_crossval_split``: sklearn ``KFold(n_splits, shuffle=True, random_state=seed)``)."""
    keys = sorted(identifiers)
    if len(keys) < n_splits:
        raise UserError(
            f"A {n_splits}-fold split needs at least {n_splits} training cases, the dataset has {len(keys)}. "
            f"Add cases or train with fold 'all'."
        )
    return [
        {"train": [str(k) for k in s["train"]], "val": [str(k) for k in s["val"]]}
        for s in generate_crossval_split(keys, seed=seed, n_splits=n_splits)
    ]


def check_fold(fold: int | str, n_splits: int, trainer_name: str) -> None:
    """nnU-Net's fold convention: ``0 .. n_splits - 1`` or ``'all'``; anything else is a UserError."""
    if fold == "all":
        return
    try:
        f = int(fold)
    except (TypeError, ValueError):
        f = None
    if f is None or not 0 <= f < n_splits or str(f) != str(fold).strip():
        raise UserError(
            f"{trainer_name} uses a {n_splits}-fold cross-validation: fold must be one of "
            f"{', '.join(str(i) for i in range(n_splits))} or 'all', got {fold!r}. "
            f"Pass a fold in that range to nnUNetv2_train."
        )


def kfold_do_split(trainer, n_splits: int, seed: int = 12345) -> tuple[list[str], list[str]]:
    """A drop-in ``do_split`` for an ``n_splits``-fold trainer: returns ``(train_keys, val_keys)`` of
    ``trainer.fold`` and keeps nnU-Net's ``splits_final.json`` conventions.

    * fold ``'all'``: nnU-Net's own ``do_split`` (train and validate on every case).
    * fold outside ``0 .. n_splits - 1``: UserError.
    * ``splits_final.json`` does not exist: :func:`kfold_split` of the preprocessed case identifiers is written
      there (nnU-Net's format; rank 0 only under DDP: the content is deterministic, so every rank uses the
      same split without reading the file back).
    * it exists with ``n_splits`` folds: it is used (a user-made split wins, as in nnU-Net); a note is logged if
      it differs from the seeded split.
    * it exists with another number of folds (e.g. the 5-fold split of an earlier nnU-Net training):
      UserError naming the fix; the file is not overwritten, since other trainings of the dataset used it.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    name = type(trainer).__name__
    check_fold(trainer.fold, n_splits, name)
    if trainer.fold == "all":
        return nnUNetTrainer.do_split(trainer)
    fold = int(trainer.fold)
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    splits_file = os.path.join(str(trainer.preprocessed_dataset_folder_base), SPLITS_FILE_NAME)
    expected = kfold_split(
        trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder), n_splits, seed
    )
    if not os.path.isfile(splits_file):
        trainer.print_to_log_file(
            f"Creating new {n_splits}-fold cross-validation split (KFold, shuffle, seed {seed}): {splits_file}"
        )
        if getattr(trainer, "local_rank", 0) == 0:
            save_json(expected, splits_file)
        splits = expected
    else:
        trainer.print_to_log_file("Using splits from existing split file:", splits_file)
        splits = load_json(splits_file)
        if len(splits) != n_splits:
            raise UserError(
                f"{splits_file} holds a {len(splits)}-fold split, but {name} uses {n_splits} folds (KFold, "
                f"shuffle, seed {seed}). Move that file away (other trainings of this dataset used it: keep a "
                f"copy) and rerun to have the {n_splits}-fold split written, or train with a trainer that uses "
                f"the existing split."
            )
        if splits != expected:
            trainer.print_to_log_file(
                f"NOTE: {splits_file} holds a user-provided {n_splits}-fold split that differs from the seeded "
                f"KFold split (seed {seed}); using the file, as nnU-Net does."
            )
    tr_keys, val_keys = splits[fold]["train"], splits[fold]["val"]
    trainer.print_to_log_file(
        f"Desired fold for training: {fold}. This split has {len(tr_keys)} training and {len(val_keys)} "
        f"validation cases."
    )
    return tr_keys, val_keys


class KFoldSplit:
    """Mixin for an nnU-Net trainer on a fixed k-fold split; list it BEFORE the trainer class::

        class nnUNetTrainerBANet_4fold(KFoldSplit, nnUNetTrainerBANet):
            num_folds = 4

    The fold is checked before anything is written, and ``do_split`` is :func:`kfold_do_split`.
    """

    num_folds: int = 4
    split_seed: int = 12345

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        check_fold(fold, self.num_folds, type(self).__name__)  # fail before anything is written
        super().__init__(plans, configuration, fold, dataset_json, device)

    def do_split(self):
        return kfold_do_split(self, self.num_folds, self.split_seed)
