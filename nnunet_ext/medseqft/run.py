"""``nnunet-ext medseqft run``: a whole task sequence D_1..D_n from a foundation checkpoint M_0.

For every strategy and task t (in order):

* ``medseqft``: MDS buffer of D_t under M_0 (``medseqft_buffer.json`` in D_t's preprocessed folder, from the
  fold's training cases), then ``nnUNetTrainerMedSeqFT`` on D_t from M_{t-1} (M_0 for t = 1): it first trains
  the full fine-tuning expert M_t^FFT (``nnUNetTrainerMedSeqFTExpert``, same schedule, in this strategy's
  results), then the LoRA student that distils it -> M_t (LoRA merged); the expert's time counts;
* ``medseqft_noexpert``: the same without the expert stage (``nnUNetTrainerMedSeqFTNoExpert``);
* ``sequential``: plain full fine-tuning, ``nnUNetTrainer`` on D_t from M_{t-1} of this strategy;
* ``parallel``: ``nnUNetTrainer`` on D_t from M_0 (one independent fine-tune per task; its task-1 model IS
  the sequential task-1 model, which is reused instead of trained twice).

Trainings run in this process through nnU-Net's own code path (``get_trainer_from_args`` ->
``maybe_load_checkpoint(pretrained_weights=...)`` -> ``run_training()``, what ``nnUNetv2_train -pretrained_weights``
does), each strategy with its own ``nnUNet_results`` under ``OUT/<strategy>/`` so the same trainer on the same
dataset does not collide; nnU-Net's final validation is skipped (the test sets are evaluated instead).
Finished trainings (``checkpoint_final.pth`` present) are not repeated: an interrupted run resumes.

Label sets: every task is its own nnU-Net dataset with its own labels; the network body (everything but
``seg_layers``) is shared and must have the same architecture in every dataset's plans (check:
``nnUNetv2_move_plans_between_datasets``); the heads are per task (nnU-Net's ``-pretrained_weights`` never
loads ``seg_layers``, so each fine-tuning starts a new head). Forgetting matrix: entry (t, s), s <= t, is
the mean Dice over D_s's foreground labels on D_s's test set (``imagesTs``/``labelsTs`` of the raw dataset)
of M_t's body with M_s's head (the head task s was trained with), predicted with nnU-Net's predictor.
Summaries: ``final`` (mean of the last row), ``bwt`` (backward transfer: mean over s < n of
R[n][s] - R[s][s]; negative = forgetting).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.inference import torch_device
from nnunet_ext.core.io import read_json
from nnunet_ext.medseqft.settings import STRATEGIES, SUFFIX

MEDSEQFT_TRAINERS = {
    "medseqft": "nnUNetTrainerMedSeqFT",
    "medseqft_noexpert": "nnUNetTrainerMedSeqFTNoExpert",
}


@contextlib.contextmanager
def _results_root(path: Path):
    old = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old


def _trainer(name: str, dataset: str, configuration: str, fold: int, plans_identifier: str, device):
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_ext.core.nnunet_commands import find_trainer

    cls = find_trainer(name)
    base = Path(str(nnUNet_preprocessed)) / dataset
    fix = f"run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} (again)"
    plans = read_json(base / f"{plans_identifier}.json", "the plans file", fix)
    if configuration not in plans.get("configurations", {}):
        raise UserError(
            f"configuration {configuration!r} is not in {base / f'{plans_identifier}.json'}; {fix}"
        )
    plans["continue_training"] = False
    dataset_json = read_json(base / "dataset.json", "the preprocessed dataset.json", fix)
    return cls(plans, configuration, fold, dataset_json, device=device)


def check_compatible(checkpoint: str, datasets: list[str], configuration: str, plans_identifier: str) -> None:
    """Every task's network must have M_0's body (same keys and shapes except seg_layers)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnunet_ext.medseqft.method import read_checkpoint

    ckpt = read_checkpoint(checkpoint, "the pretrained checkpoint", "pass M_0's fold_X/checkpoint_final.pth")
    body = {k: tuple(v.shape) for k, v in ckpt["network_weights"].items() if ".seg_layers." not in k}
    for name in datasets:
        trainer = _trainer("nnUNetTrainer", name, configuration, 0, plans_identifier, torch.device("cpu"))
        net = trainer.build_network_architecture(
            trainer.plans_manager,
            trainer.configuration_manager,
            determine_num_input_channels(
                trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json
            ),
            trainer.label_manager.num_segmentation_heads,
            False,
        )
        mine = {k: tuple(v.shape) for k, v in net.state_dict().items() if ".seg_layers." not in k}
        if mine != body:
            diff = sorted(set(mine.items()) ^ set(body.items()))[:3]
            raise UserError(
                f"{name} ({configuration}, {plans_identifier}) builds a network whose body differs from the "
                f"checkpoint {checkpoint} (e.g. {diff}). All tasks must share the architecture: copy the plans "
                f"with nnUNetv2_move_plans_between_datasets -s SOURCE -t TARGET -sp {plans_identifier} -tp "
                f"{plans_identifier}, then nnUNetv2_preprocess -d TARGET -c {configuration}"
            )


def train(
    strategy_root: Path,
    trainer_name: str,
    dataset: str,
    configuration: str,
    fold: int,
    plans_identifier: str,
    pretrained: str,
    device,
    epochs: int | None = None,
    iterations: int | None = None,
    attributes: dict | None = None,
) -> Path:
    """Train (unless finished; an interrupted training continues from its checkpoint_latest.pth) and return the
    checkpoint_final.pth of this training. ``attributes`` are set on the trainer before it initialises (e.g.
    ``{"lora_lr": 0.1}``; the same in every process)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    model = strategy_root / dataset / f"{trainer_name}__{plans_identifier}__{configuration}" / f"fold_{fold}"
    final = model / "checkpoint_final.pth"
    if final.is_file():
        print(f"  done before: {final}", flush=True)
        return final
    with _results_root(strategy_root):
        trainer = _trainer(trainer_name, dataset, configuration, fold, plans_identifier, device)
        for key, value in (attributes or {}).items():
            if not hasattr(trainer, key):
                raise UserError(f"{trainer_name} has no setting {key!r}")
            setattr(trainer, key, value)
        if epochs:  # same override for every strategy: a shorter schedule than the trainer's
            trainer.num_epochs = trainer.save_every = int(epochs)
        if iterations:
            trainer.num_iterations_per_epoch = int(iterations)
            trainer.num_val_iterations_per_epoch = max(
                1, min(trainer.num_val_iterations_per_epoch, iterations // 5)
            )
        # an interrupted training goes on from its last checkpoint (as `nnUNetv2_train --c`; LoRA and MedSeqFT
        # put their frozen base back from lora_start.pth), otherwise it starts from ``pretrained``
        resume = (model / "checkpoint_latest.pth").is_file()
        if resume:
            print(f"  continuing from {model / 'checkpoint_latest.pth'}", flush=True)
        maybe_load_checkpoint(trainer, resume, False, None if resume else str(pretrained))
        trainer.run_training()
    if not final.is_file():
        raise UserError(f"training {trainer_name} on {dataset} wrote no {final}; see the log in {model}")
    return final


RETRAIN = "delete it and rerun the same command: the training of that model runs again"


def _composite(body_ckpt: Path, head_ckpt: Path) -> dict:
    from nnunet_ext.medseqft.method import read_checkpoint

    body = read_checkpoint(body_ckpt, "the trained model", RETRAIN)["network_weights"]
    head = read_checkpoint(head_ckpt, "the trained model", RETRAIN)["network_weights"]
    weights = {k: v for k, v in body.items() if ".seg_layers." not in k}
    weights.update({k: v for k, v in head.items() if ".seg_layers." in k})
    return weights


def evaluate(
    body_ckpt: Path, head_ckpt: Path, raw_dataset: Path, device, max_cases: int | None = None
) -> float:
    """Mean Dice over the test set of ``raw_dataset`` of body(M_t) + head(M_s) with nnU-Net's predictor."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.core.inference import predictor_for_network
    from nnunet_ext.core.nnunet_commands import find_trainer
    from nnunet_ext.medseqft.method import dice_of, read_checkpoint

    model = head_ckpt.parent.parent
    fix = f"delete {head_ckpt.parent} and rerun the same command: that training runs again"
    plans_manager = PlansManager(read_json(model / "plans.json", "the model's plans", fix))
    dataset_json = read_json(model / "dataset.json", "the model's dataset.json", fix)
    ckpt = read_checkpoint(head_ckpt, "the trained model", RETRAIN, keys=("network_weights", "init_args"))
    cm = plans_manager.get_configuration(ckpt["init_args"]["configuration"])
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = find_trainer("nnUNetTrainer").build_network_architecture(
        plans_manager,
        cm,
        determine_num_input_channels(plans_manager, cm, dataset_json),
        label_manager.num_segmentation_heads,
        False,
    )
    predictor = predictor_for_network(
        network,
        plans_manager,
        cm,
        dataset_json,
        ckpt["trainer_name"],
        ckpt.get("inference_allowed_mirroring_axes"),
        device,
        parameters=[_composite(body_ckpt, head_ckpt)],
        tta=False,
    )
    ending = dataset_json["file_ending"]
    labels = sorted(int(v) for k, v in dataset_json["labels"].items() if k != "background" and k != "ignore")
    cases = sorted(p.name[: -len(ending)] for p in (raw_dataset / "labelsTs").glob(f"*{ending}"))
    if not cases:
        raise UserError(
            f"{raw_dataset}/labelsTs holds no {ending} labels: the forgetting matrix needs test sets"
        )
    reader = plans_manager.image_reader_writer_class()
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    scores = []
    for case in cases[:max_cases]:
        images = [str(raw_dataset / "imagesTs" / f"{case}_{c:04d}{ending}") for c in range(n_channels)]
        if not all(Path(p).is_file() for p in images):
            raise UserError(f"test images of {case} missing in {raw_dataset}/imagesTs ({images})")
        img, props = reader.read_images(images)
        pred = predictor.predict_single_npy_array(img, props, None, None, False)
        gt, _ = reader.read_seg(str(raw_dataset / "labelsTs" / f"{case}{ending}"))
        scores.append(dice_of(np.asarray(pred), np.asarray(gt[0]), labels))
    valid = [s for s in scores if not math.isnan(s)]
    return float(np.mean(valid)) if valid else math.nan


def summarise(matrix: list[list[float]]) -> dict:
    n = len(matrix)
    final = float(np.nanmean(matrix[-1])) if n else math.nan
    bwt = float(np.nanmean([matrix[-1][s] - matrix[s][s] for s in range(n - 1)])) if n > 1 else 0.0
    return {"final": final, "bwt": bwt}


def format_matrix(strategy: str, names: list[str], matrix: list[list[float]]) -> str:
    lines = [f"{strategy}: Dice of M_t (rows) on the test set of task s (columns)"]
    lines.append("| model | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for t, row in enumerate(matrix):
        cells = [f"{v:.3f}" for v in row] + [""] * (len(names) - len(row))
        lines.append(f"| M_{t + 1} | " + " | ".join(cells) + " |")
    s = summarise(matrix)
    lines.append(f"final mean Dice {s['final']:.3f}, backward transfer {s['bwt']:+.3f}")
    return "\n".join(lines)


def run_sequence(
    pretrained: str | os.PathLike,
    datasets: list[str | int],
    configuration: str,
    output: str | os.PathLike,
    strategies: tuple[str, ...] = STRATEGIES,
    schedule: str = "full",
    fold: int = 0,
    plans_identifier: str = "nnUNetPlans",
    k: int | None = None,
    fraction: float = 0.2,
    views: int = 8,
    seed: int = 0,
    score: str = "auto",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    max_test_cases: int | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    lora_lr: float | None = None,
    kd_weight: float | None = None,
) -> dict:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    from nnunet_ext.core.io import atomic_write_json, atomic_write_text
    from nnunet_ext.core.paths import dataset_name
    from nnunet_ext.medseqft.method import (
        buffer_path,
        existing_buffer,
        select_buffer,
        write_buffer,
    )

    pretrained = Path(pretrained).expanduser().resolve()
    if not pretrained.is_file():
        raise UserError(
            f"pretrained checkpoint {pretrained} does not exist (pass M_0's checkpoint_final.pth)"
        )
    if schedule not in SUFFIX:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SUFFIX)}")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise UserError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
    if len(datasets) < 1:
        raise UserError("pass at least one dataset (-d ID [ID ...])")
    if lora_lr is not None and not lora_lr > 0:
        raise UserError(f"--lora-lr must be a positive learning rate, got {lora_lr}")
    if kd_weight is not None and not kd_weight >= 0:
        raise UserError(f"--kd-weight must be >= 0, got {kd_weight}")
    dev = torch_device(device)  # auto: CUDA if available; a device this machine lacks is refused here
    # MedSeqFT's trainer settings for this run (None: the trainer's default)
    medseqft_settings = {k: v for k, v in (("lora_lr", lora_lr), ("kd_weight", kd_weight)) if v is not None}
    for var, value in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not value.is_set():
            raise UserError(f"{var} is not set: export {var}=/path/to/{var}")
    names = []
    for d in datasets:
        names.append(dataset_name(d))
    if len(set(names)) != len(names):
        raise UserError(f"a task appears twice in {names}; pass each dataset once")
    check_compatible(str(pretrained), names, configuration, plans_identifier)
    if any(s in MEDSEQFT_TRAINERS for s in strategies):
        for name in names:  # a broken buffer file is refused now, not after hours of training
            existing_buffer(buffer_path(name, plans_identifier), overwrite)
    out = Path(output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # one run per folder at a time: a second `medseqft run` into the same --output would train into the same
    # model folders (the lock is taken over once its process is gone)
    from nnunet_ext.core.nnunet_commands import RunLock

    with RunLock(out / "medseqft_run.lock", f"the medseqft run in {out}"):
        settings = {
            "pretrained": str(pretrained),
            "datasets": names,
            "configuration": configuration,
            "plans": plans_identifier,
            "fold": fold,
            "schedule": schedule,
            "epochs": epochs,
            "iterations": iterations,
            "lora_lr": lora_lr,
            "kd_weight": kd_weight,
        }
        state_file = out / "medseqft_run.json"
        if state_file.is_file():
            try:
                old = read_json(
                    state_file,
                    "the run's state file",
                    "pass --overwrite to start the run again in this folder (its models are deleted), or choose "
                    "another --output folder",
                ).get("settings", {})
            except UserError:
                if not overwrite:
                    raise
                old = None  # --overwrite: a broken state file is replaced and the run starts again
            if old != settings and not overwrite:
                raise UserError(
                    f"{out} holds a run with other settings ({old}); pass --overwrite or another --output folder"
                )
            if old != settings:  # --overwrite: the old run's models must not be taken as finished trainings
                import shutil

                for s in STRATEGIES:
                    shutil.rmtree(out / s, ignore_errors=True)
        atomic_write_json(state_file, {"settings": settings})
        suffix = SUFFIX[schedule]
        models: dict[str, list[Path]] = {s: [] for s in strategies}
        times: dict[str, float] = {s: 0.0 for s in strategies}
        for t, name in enumerate(names):
            print(f"\n=== task {t + 1}/{len(names)}: {name} ===", flush=True)
            for strategy in strategies:
                root = out / strategy
                start = time.perf_counter()
                if strategy in MEDSEQFT_TRAINERS:
                    print(f"[{strategy}] MDS selection on {name}", flush=True)
                    record = select_buffer(
                        pretrained,
                        name,
                        configuration,
                        k,
                        fraction,
                        views,
                        seed,
                        score,
                        plans_identifier,
                        device=dev,
                        progress=False,
                        fold=fold,
                    )
                    write_buffer(record, buffer_path(name, plans_identifier), overwrite)
                    print(f"[{strategy}] buffer: {record['buffer']}", flush=True)
                    init = models[strategy][-1] if t else pretrained
                    trainer = f"{MEDSEQFT_TRAINERS[strategy]}{suffix}"
                elif strategy == "sequential":
                    init = models[strategy][-1] if t else pretrained
                    trainer = f"nnUNetTrainer{suffix}"
                else:
                    init = pretrained
                    trainer = f"nnUNetTrainer{suffix}"
                    if t == 0 and "sequential" in strategies:
                        models[strategy].append(models["sequential"][0])  # identical training: reuse
                        print("[parallel] task 1 = the sequential task-1 model (same training)", flush=True)
                        continue
                print(f"[{strategy}] {trainer} on {name} from {init}", flush=True)
                models[strategy].append(
                    train(
                        root,
                        trainer,
                        name,
                        configuration,
                        fold,
                        plans_identifier,
                        str(init),
                        dev,
                        epochs,
                        iterations,
                        medseqft_settings if strategy in MEDSEQFT_TRAINERS else None,
                    )
                )
                times[strategy] += time.perf_counter() - start

        print("\n=== forgetting matrices ===", flush=True)
        raw = Path(str(nnUNet_raw))
        result = {"settings": settings, "strategies": {}}
        text = []
        for strategy in strategies:
            matrix = []
            for t in range(len(names)):
                row = []
                for s in range(t + 1):
                    row.append(
                        evaluate(
                            models[strategy][t], models[strategy][s], raw / names[s], dev, max_test_cases
                        )
                    )
                matrix.append(row)
            result["strategies"][strategy] = {
                "models": [str(m) for m in models[strategy]],
                "matrix": matrix,
                "train_seconds": round(times[strategy], 1),
                **summarise(matrix),
            }
            text.append(format_matrix(strategy, names, matrix))
            print(text[-1] + "\n", flush=True)
        summary = ["| strategy | final mean Dice | backward transfer | train time [s] |", "|---|---|---|---|"]
        for strategy, entry in result["strategies"].items():
            summary.append(
                f"| {strategy} | {entry['final']:.3f} | {entry['bwt']:+.3f} | {entry['train_seconds']:.0f} |"
            )
        text.insert(0, "\n".join(summary))
        print(text[0], flush=True)
        atomic_write_json(state_file, result)
        atomic_write_text(out / "forgetting.md", "\n\n".join(text) + "\n")
        print(f"wrote {state_file} and {out / 'forgetting.md'}")
        return result


def _cmd_run(args: argparse.Namespace) -> int:
    run_sequence(
        args.pretrained,
        args.datasets,
        args.configuration,
        args.output,
        strategies=tuple(args.strategies),
        schedule=args.schedule,
        fold=args.fold,
        plans_identifier=args.plans,
        k=args.k,
        fraction=args.fraction,
        views=args.views,
        seed=args.seed,
        score=args.score,
        device=args.device,
        overwrite=args.overwrite,
        max_test_cases=args.max_test_cases,
        epochs=args.epochs,
        iterations=args.iterations,
        lora_lr=args.lora_lr,
        kd_weight=args.kd_weight,
    )
    return 0
