"""``--c`` resume of our trainers against an uninterrupted run of the same length (issue 17, Tests).

nnU-Net stores no RNG state in its checkpoints, so even its own ``nnUNetTrainer`` resumes bit-identically only
when the resumed run sees the same batches. The check therefore takes the data pipeline out of the question and
asks whether the CHECKPOINT carries everything the training state is made of:

1. run A: ``run_training()`` for ``EPOCHS`` epochs (``save_every = 1``) on batches drawn once from the trainer's
   own loaders (nnU-Net's, UniSeg's task-balanced one, MedSeqFT's buffer loader) and replayed from a list; the
   ``checkpoint_latest.pth`` written after epoch ``STOP - 1`` is kept (the "interruption");
2. run B: a fresh trainer, built like ``nnUNetv2_train`` builds it, ``load_checkpoint``s that file (what ``--c``
   calls) and runs ``run_training()`` to the end on the same batches from epoch ``STOP`` on;
3. the state of A and B just before ``on_train_end`` (network incl. unmerged LoRA adapters and frozen base,
   optimizer, learning rates, epoch counter, logger, best EMA, grad scaler and the method's own state: DoDNet's
   task heads and merge weights, UniSeg's prompt (network buffers/parameters), MedSeqFT's teachers, expert
   and buffer record) and their ``checkpoint_final.pth`` files must be IDENTICAL (``torch.equal``).

Every epoch starts from the same torch/numpy/random seed in both runs (nnU-Net does not restore RNG; with no
dropout in these networks nothing in a training step draws random numbers, the seed only makes sure of it).
One torch thread, CPU, the tiny configuration. ``nnUNetTrainer`` itself is the first case: it is the
condition ("where nnU-Net's own trainer does") under which the others must hold.

Where nnU-Net's own trainer does NOT resume identically: ``_best_ema``. ``on_epoch_end`` writes
``checkpoint_latest.pth`` before that epoch's best-EMA update, so a resumed run starts from the best EMA of one
epoch earlier (``None`` after epoch 0) and may overwrite a better ``checkpoint_best.pth``. Every trainer is
checked to load it exactly as nnU-Net does (the rule replayed from the checkpoint's value) instead.

LoRA / MedSeqFT: checkpoints hold the merged body once plus the adapters; the frozen base comes back
bit-exactly from ``lora_start.pth`` (written once per training, identified by the digest each checkpoint
records). Without that file ``--c`` still resumes, with the base rebuilt as ``W_merged - delta`` (float
rounding) and a warning in the log: checked separately.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.lora_helpers import _setenv, foundation_checkpoint, make_trainer

from nnunet_ext.core import lora, train_step
from nnunet_ext.core.nnunet_commands import find_trainer

EPOCHS = 3  # run length
STOP = 1  # run B resumes from the checkpoint_latest.pth written after epoch STOP - 1
ITERATIONS = 2  # training steps per epoch
VAL_ITERATIONS = 1

# trainer -> (phantom dataset, kind, fine-tunes a pretrained network)
CASES = {
    "nnUNetTrainer": (501, "full", False),
    "nnUNetTrainerBANet": (501, "full", False),
    "nnUNetTrainerDoDNet": (502, "partial", False),
    "nnUNetTrainerTransDoDNet": (502, "partial", False),
    "nnUNetTrainerUniSeg": (502, "partial", False),
    "nnUNetTrainerLoRA": (501, "full", True),
    "nnUNetTrainerMedSeqFT": (501, "full", True),
}


class Replay:
    """An endless-looking loader that hands out deep copies of recorded batches, from ``start`` on."""

    def __init__(self, batches: list, start: int = 0):
        self.batches, self.i = batches, start

    def __iter__(self):
        return self

    def __next__(self):
        batch = copy.deepcopy(self.batches[self.i])
        self.i += 1
        return batch


def _draw(loader, n: int) -> list:
    return [copy.deepcopy(next(loader)) for _ in range(n)]


def _instrument(trainer, batches: dict, start_epoch: int, record: bool) -> dict:
    """Replay fixed batches through the trainer's own hooks; seed every epoch; capture the state before
    ``on_train_end``. ``record``: draw the batches from the trainer's real loaders first (run A)."""
    captured: dict = {}
    get_dataloaders = trainer.get_dataloaders

    def replay_dataloaders():
        if record:
            tr, val = get_dataloaders()
            batches["train"] = _draw(tr, EPOCHS * ITERATIONS)
            batches["val"] = _draw(val, EPOCHS * VAL_ITERATIONS)
        return (
            Replay(batches["train"], start_epoch * ITERATIONS),
            Replay(batches["val"], start_epoch * VAL_ITERATIONS),
        )

    trainer.get_dataloaders = replay_dataloaders
    if hasattr(trainer, "get_buffer_dataloader"):  # MedSeqFT: one buffer batch per training step
        get_buffer = trainer.get_buffer_dataloader

        def replay_buffer():
            if record:
                batches["buffer"] = _draw(get_buffer(), EPOCHS * ITERATIONS)
            return Replay(batches["buffer"], start_epoch * ITERATIONS)

        trainer.get_buffer_dataloader = replay_buffer

    on_train_epoch_start = trainer.on_train_epoch_start

    def seeded_epoch_start():
        seed = 1000 + trainer.current_epoch
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        on_train_epoch_start()

    trainer.on_train_epoch_start = seeded_epoch_start

    on_train_end = trainer.on_train_end

    def capturing_train_end():
        captured.update(_state(trainer))
        on_train_end()

    trainer.on_train_end = capturing_train_end
    return captured


def _state(trainer) -> dict:
    """Everything a training carries from one epoch to the next (deep copies)."""
    net = train_step.unwrap(
        trainer.network
    )  # FeatureTap (MedSeqFT) stays: its keys are the network's, prefixed
    logging = {k: v for k, v in trainer.logger.get_checkpoint().items() if "timestamp" not in k}
    state = {
        "network": net.state_dict(),
        "network_buffers_nonpersistent": {k: b for k, b in net.named_buffers()},
        "optimizer": trainer.optimizer.state_dict(),
        "lrs": [g["lr"] for g in trainer.optimizer.param_groups],
        "scheduler_last_lr": getattr(trainer.lr_scheduler, "_last_lr", None),
        "grad_scaler": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "current_epoch": trainer.current_epoch,
        "best_ema": trainer._best_ema,
        "logging": logging,
        "trainable": sorted(n for n, p in net.named_parameters() if p.requires_grad),
    }
    if hasattr(trainer, "lora_injected"):
        state["lora_injected"] = trainer.lora_injected
        state["lora_adapters"] = lora.adapter_state_dict(trainer.base_network())
    if hasattr(trainer, "teachers"):  # MedSeqFT
        state["teachers"] = [t.state_dict() for t in trainer.teachers]
        state["teacher_mix"] = list(trainer.teacher_mix)
        ex = trainer.expert_network
        state["expert"] = None if ex is None else ex.state_dict()
        state["buffer_record"] = trainer.buffer_record
    return copy.deepcopy(state)


def _final(trainer) -> dict:
    ckpt = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", weights_only=False)
    ckpt["logging"] = {k: v for k, v in ckpt["logging"].items() if "timestamp" not in k}
    ckpt.pop("init_args")  # the plans as loaded: identical by construction, big
    return ckpt


def _differences(a, b, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` are not identical (tensors bitwise, floats exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"]
        if torch.equal(a, b) or (
            a.is_floating_point()
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        ):
            return []
        diff = (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item()
        return [f"{path}: max |diff| {diff:.3g} (of {a.double().abs().max().item():.3g})"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))[:5]}"] if set(a) != set(b) else []
        for k in a:
            if k in b:
                out += _differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b, equal_nan=True) else [f"{path}: arrays differ"]
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return []
        return [f"{path}: max |diff| {abs(float(a) - float(b)):.3g} (of {abs(float(a)):.3g})"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


@pytest.fixture
def one_thread(torch_threads):
    torch_threads(1)


def _build(name: str, dataset: str, pretrained: str | None):
    """A trainer as ``nnUNetv2_train DATASET 3d_tiny 0 -tr NAME`` builds it, with a tiny schedule."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    trainer = make_trainer(name, dataset)
    trainer.num_epochs = EPOCHS
    trainer.num_iterations_per_epoch = ITERATIONS
    trainer.num_val_iterations_per_epoch = VAL_ITERATIONS
    trainer.save_every = 1
    if pretrained is not None:  # -pretrained_weights (the first run only: --c refuses it)
        maybe_load_checkpoint(trainer, False, False, pretrained)
    return trainer


def _best_ema_rule(start, ema: list) -> float | None:
    """nnU-Net's ``on_epoch_end``: the best EMA pseudo Dice so far, from ``start`` over the epochs' EMA values."""
    best = start
    for value in ema:
        if best is None or value > best:
            best = value
    return best


def _pop_best_ema(state: dict, final: dict) -> tuple:
    return state.pop("best_ema"), final.pop("_best_ema")


def _resume(name: str, dataset: str, batches: dict, interrupted: Path):
    """Run B: a fresh trainer (another random initialisation) resumed from ``interrupted`` exactly as
    ``nnUNetv2_train --c`` does (``load_checkpoint``), trained to the end on the recorded batches."""
    torch.manual_seed(1)
    b = _build(name, dataset, None)
    b.load_checkpoint(str(interrupted))  # what nnUNetv2_train --c calls
    assert b.current_epoch == STOP
    state = _instrument(b, batches, STOP, record=False)
    b.run_training()
    return state, _final(b)


@pytest.mark.slow  # plans + preprocesses the full and partial phantoms (shared with the other trainer tests)
@pytest.mark.parametrize("name", list(CASES))
def test_resume_equals_uninterrupted_run(name, phantom_workspace, monkeypatch, tmp_path, one_thread):
    dataset_id, kind, fine_tunes = CASES[name]
    dataset = phantom_workspace.dataset(dataset_id, kind).name
    pretrained = foundation_checkpoint(phantom_workspace)[1] if fine_tunes else None
    _setenv(monkeypatch, phantom_workspace)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))

    if name == "nnUNetTrainerMedSeqFT":  # the MDS buffer of this fold's training cases (not written to disk)
        from nnunet_ext.medseqft.method import select_buffer

        record = select_buffer(pretrained, dataset, "3d_tiny", k=2, views=1, progress=False, fold=0)
        module = sys.modules[find_trainer(name).__module__]
        monkeypatch.setattr(module, "load_buffer", lambda folder: copy.deepcopy(record))

    batches: dict = {}
    # run A: uninterrupted; keep the checkpoint_latest.pth of epoch STOP - 1
    torch.manual_seed(0)
    a = _build(name, dataset, pretrained)
    state_a = _instrument(a, batches, 0, record=True)
    interrupted = tmp_path / "checkpoint_latest.pth"
    on_epoch_end = a.on_epoch_end

    def keep_latest():
        on_epoch_end()
        if a.current_epoch == STOP:
            shutil.copyfile(Path(a.output_folder) / "checkpoint_latest.pth", interrupted)

    a.on_epoch_end = keep_latest
    a.run_training()
    final_a = _final(a)
    assert interrupted.is_file() and state_a["current_epoch"] == EPOCHS
    ckpt = torch.load(interrupted, weights_only=False)
    ema = [float(v) for v in state_a["logging"]["ema_fg_dice"]]
    best_a = _pop_best_ema(state_a, final_a)
    assert best_a == (_best_ema_rule(None, ema),) * 2

    def check(state_b: dict, final_b: dict) -> list[str]:
        # the runs did train: the resumed epochs changed the weights of the interrupted checkpoint
        assert _differences(ckpt["network_weights"], final_b["network_weights"])
        # nnU-Net writes checkpoint_latest.pth BEFORE the epoch's best-EMA update (on_epoch_end), so a resumed
        # run continues from the best EMA of one epoch earlier (None after epoch 0): nnU-Net's own trainer does
        # not resume _best_ema identically either. Ours must load it as nnU-Net does.
        expected = _best_ema_rule(ckpt["_best_ema"], ema[STOP:])
        assert _pop_best_ema(state_b, final_b) == (expected, expected)
        return _differences(state_a, state_b, "state") + _differences(final_a, final_b, "checkpoint_final")

    diff = check(*_resume(name, dataset, batches, interrupted))
    assert not diff, f"{name}: --c resume differs from the uninterrupted run:\n" + "\n".join(diff[:25])


def test_resume_without_the_start_state_file_rebuilds_the_base(phantom_workspace, monkeypatch, tmp_path):
    """``--c`` of a LoRA training whose ``lora_start.pth`` is gone: the base is rebuilt as W_merged - delta
    (float rounding), the log says so, and a new start file makes the next resume exact again."""
    from nnunet_ext.trainers.nnUNetTrainerLoRA import START_FILE

    dataset = phantom_workspace.dataset(501, "full").name
    pretrained = foundation_checkpoint(phantom_workspace)[1]
    _setenv(monkeypatch, phantom_workspace)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    torch.manual_seed(0)
    a = _build("nnUNetTrainerLoRA", dataset, pretrained)
    a.num_epochs = 1
    a.run_training()
    start_file = Path(a.output_folder) / START_FILE
    saved = torch.load(start_file, weights_only=True)
    merged = train_step.unwrap(a.network).state_dict()  # stock keys: on_train_end merged the adapters
    ckpt = torch.load(Path(a.output_folder) / "checkpoint_final.pth", weights_only=False)
    assert ckpt["lora_start_sha256"] == saved["sha256"] == lora.state_digest(saved["state"])
    assert set(saved["state"]) == set(merged)

    start_file.unlink()
    b = _build("nnUNetTrainerLoRA", dataset, None)
    b.load_checkpoint(str(Path(a.output_folder) / "checkpoint_final.pth"))
    base = train_step.unwrap(b.network).state_dict()
    rebuilt = {k.replace(".base_layer.", "."): v for k, v in base.items() if ".base_layer." in k}
    assert rebuilt
    worst = max((rebuilt[k] - saved["state"][k]).abs().max().item() for k in rebuilt)
    assert worst < 1e-5
    assert "is missing or belongs to another training" in Path(b.log_file).read_text()
    again = torch.load(start_file, weights_only=True)  # written anew from the rebuilt base
    assert again["sha256"] == lora.state_digest(again["state"]) == b.lora_start_sha256
