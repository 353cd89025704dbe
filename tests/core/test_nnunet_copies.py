"""Where a trainer of ours must repeat nnU-Net code (issue 18 item 4), compare it with the INSTALLED nnU-Net, so that
a minor-version bump that changes the original fails here, loudly, instead of silently diverging:

* UniSeg's ``get_dataloaders`` (nnU-Net's, with the task-balanced training loader): every call it repeats gets
  the same arguments (positional count and keyword names) as in nnU-Net's, and the loaders are wrapped the same
  way (the augmenters and their arguments);
* LoRA's ``save_checkpoint`` / ``load_checkpoint``: our checkpoint holds every key nnU-Net writes and reads;
* the deep-supervision weights our multi-task losses get (``core.train_step.deep_supervision``): the weights
  nnU-Net's own ``_build_loss`` computes, in nnU-Net's ``DeepSupervisionWrapper``, for every DDP/compile case.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_ext.core.train_step import deep_supervision, per_scale_loss
from nnunet_ext.trainers import nnUNetTrainerLoRA, nnUNetTrainerUniSeg

#: our loader stands in for nnU-Net's training loader
SAME_AS = {"TaskBalancedDataLoader": "nnUNetDataLoader"}


def tree(function) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def calls(function) -> dict[str, list[tuple[int, tuple[str, ...]]]]:
    """{callee name: [(positional argument count, keyword names)] in source order}."""
    out: dict[str, list] = {}
    for node in ast.walk(tree(function)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name:
                name = SAME_AS.get(name, name)
                out.setdefault(name, []).append((len(node.args), tuple(sorted(k.arg for k in node.keywords))))
    return out


def dict_keys(function) -> set[str]:
    keys = set()
    for node in ast.walk(tree(function)):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if isinstance(node.slice.value, str):
                keys.add(node.slice.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                keys.add(node.args[0].value)  # checkpoint.get("key", default)
    return keys


def test_uniseg_get_dataloaders_repeats_nnunets_calls():
    theirs, ours = calls(nnUNetTrainer.get_dataloaders), calls(nnUNetTrainerUniSeg.get_dataloaders)
    repeated = [
        "infer_dataset_class",
        "_get_deep_supervision_scales",
        "configure_rotation_dummyDA_mirroring_and_inital_patch_size",
        "get_training_transforms",
        "get_validation_transforms",
        "get_tr_and_val_datasets",
        "nnUNetDataLoader",
        "get_allowed_n_proc_DA",
        "SingleThreadedAugmenter",
        "NonDetMultiThreadedAugmenter",
    ]
    assert set(repeated) <= set(theirs), f"nnU-Net's get_dataloaders changed: {sorted(theirs)}"
    for name in repeated:
        mine = [(n, tuple(k for k in kw if k != "task_of_case")) for n, kw in ours.get(name, [])]
        assert mine == theirs[name], (
            f"nnunetv2's get_dataloaders calls {name} as {theirs[name]}, trainers/nnUNetTrainerUniSeg.py as {mine}: "
            f"update UniSeg's copy to the installed nnU-Net"
        )
    # nothing nnU-Net calls there is left out of ours
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"nnU-Net's get_dataloaders calls {missing}, which UniSeg's copy does not"


@pytest.mark.parametrize("method", ["save_checkpoint", "load_checkpoint"])
def test_lora_checkpoint_keeps_every_key_of_nnunets(method):
    theirs = dict_keys(getattr(nnUNetTrainer, method))
    ours = dict_keys(getattr(nnUNetTrainerLoRA, method))
    assert {"network_weights", "optimizer_state", "init_args", "current_epoch"} <= theirs  # the parse works
    missing = sorted(theirs - ours)
    assert not missing, (
        f"nnunetv2's {method} uses checkpoint keys {missing} that nnUNetTrainerLoRA.{method} does not: update it"
    )


def test_the_comparison_sees_a_changed_call():
    def original(self):
        self.get_training_transforms(1, 2, a=1)

    def changed(self):
        self.get_training_transforms(1, 2, a=1, b=2)

    assert calls(original) != calls(changed)


class _TrainerFacts:
    """What nnUNetTrainer._build_loss reads of its trainer, nothing else."""

    def __init__(self, scales: int, ddp: bool, compile_: bool, deep_supervision_on: bool = True):
        self.enable_deep_supervision = deep_supervision_on
        self.is_ddp = ddp
        self._compile = compile_
        self.label_manager = type("L", (), {"has_regions": False, "ignore_label": None})()
        self.configuration_manager = type("C", (), {"batch_dice": True})()
        self._scales = [[1.0] * 3] * scales

    def _do_i_compile(self):
        return self._compile

    def _get_deep_supervision_scales(self):
        return self._scales


@pytest.mark.parametrize("ddp,compile_", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("scales", [2, 5])
def test_deep_supervision_weights_are_nnunets(monkeypatch, scales, ddp, compile_):
    facts = _TrainerFacts(scales, ddp, compile_)
    monkeypatch.setattr(
        "torch.compile", lambda m, *a, **k: m
    )  # nnU-Net compiles its Dice; not what we compare
    theirs = nnUNetTrainer._build_loss(facts)
    ours = deep_supervision(facts, nn.Identity())
    assert type(ours) is type(theirs) is DeepSupervisionWrapper
    np.testing.assert_array_equal(np.asarray(ours.weight_factors), np.asarray(theirs.weight_factors))
    assert isinstance(per_scale_loss(ours), nn.Identity)


def test_without_deep_supervision_the_loss_is_not_wrapped():
    facts = _TrainerFacts(3, False, False, deep_supervision_on=False)
    assert not isinstance(nnUNetTrainer._build_loss(facts), DeepSupervisionWrapper)
    loss = nn.Identity()
    assert deep_supervision(facts, loss) is loss and per_scale_loss(loss) is loss
