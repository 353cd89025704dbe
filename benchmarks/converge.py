"""Accuracy at convergence (issue 20): a method and its baselines trained to the same plateau, over seeds.

    python benchmarks/converge.py banet --seeds 0 1 2                  # BA-Net vs nnUNetTrainer
    python benchmarks/converge.py multitask --seeds 0 1 2              # DoDNet, TransDoDNet, UniSeg vs nnU-Nets
    python benchmarks/converge.py labelprop4 --seeds 0 1 2             # label propagation (a)-(d), every 4th slice
    python benchmarks/converge.py banet --seeds 0 1 2 --report-only    # tables from what has finished

Data: `nnunet-ext phantoms KIND --profile converge` (one dataset per seed: the seed changes the cases, the split
and the initialisation), planned with the stock CLI plus the plans preset `converge` (configuration
3d_converge: 3d_tiny's network on 16 x 32 x 32 crops of the 24 x 40 x 40 cases). Every model is the stock
`nnUNetv2_train DATASET 3d_converge 0 -tr <Trainer>_converge` (100 epochs x 50 iterations: long enough for a
training that finds a structure late, see docs/benchmarks.md), one torch thread per run (OMP_NUM_THREADS=1,
which the converge schedule keeps: the stock nnUNetv2_train -device cpu asks for every core, see
nnunet_ext.core.schedules), so two runs of this script (other seeds or --models) can share a 2-core machine.
Then the test cases are predicted and scored per structure: Dice, HD95 and the normalised surface Dice at 1 mm (nnunet_ext.core.metrics: MONAI
surfaces, DeepMind's NSD definition).

Comparisons:

* ``banet`` (full phantom, id 930 + seed): nnUNetTrainerBANet vs nnUNetTrainer, each map from nnUNetv2_predict.
* ``multitask`` (partial phantom, id 940 + seed: liver, kidney and spleen tasks, each case annotated for its
  task only): nnUNetTrainerDoDNet / TransDoDNet / UniSeg on every case, scored on each structure's own-task map
  (`nnunet-ext predict --per-task`) and on the merged all-task map (`nnunet-ext predict`), against two baselines
  with the same schedule: one nnUNetTrainer per task on that task's cases (ids 960/970/980 + seed, labels
  renumbered; each structure from its task's model) and one nnUNetTrainer on every case with nnU-Net's ignore
  label on the structures a case's task does not annotate (id 950 + seed; the phantom's labelsTr_full says
  where they are).
* ``labelprop4`` / ``labelprop8`` (sparse phantom, every 4th / 8th axial slice annotated, id 700 / 710 + seed):
  (b) nearest and (c) shape interpolation + one pseudo-label round, each `nnunet-ext labelprop run ...
  --trainer-a/-b nnUNetTrainer_converge -f 0` as a user types it (ids RECIPE_ID + 2 * seed and the next; model
  B is scored, both models must converge), against (a) one nnUNetTrainer on the sparse labels with nnU-Net's
  ignore label and (d) one nnUNetTrainer on the dense truth (id 720 + seed, shared by k = 4 and 8: the same
  images and test cases). Datasets with an ignore label are planned after `nnunet-ext fingerprint`, as the
  recipe plans its own.

Resumable: a finished training (checkpoint_final.pth), prediction or evaluation is never redone, an
interrupted training continues from its checkpoint_latest.pth (`nnUNetv2_train --c`), and each model's result
is written as soon as it exists (<workdir>/runs/<comparison>_seed<S>_<model>.json). Its CPU time then covers
the last invocation only (recorded as "resumed"). For every training it records the length, the CPU time of
the training command, whether the validation pseudo Dice had converged (per structure: the spread of its last
20% of epochs, the change of their mean against the 20% before, and that mean above LEARNED_MIN) and a
learning-curve PNG. The report: per
model and map, mean +- std over seeds per structure, and the paired difference of every method map against
every baseline map with its std.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.core.io import atomic_write_json, atomic_write_text
from nnunet_ext.core.schedules import SCHEDULES


@dataclass(frozen=True)
class Model:
    """One model of a comparison: ``trainer`` trained as ``<trainer>_converge`` on ``data`` ("source": the
    seed's phantom; "ignore": every case with the ignore label on unannotated structures; "per-task": one
    dataset and model per task), scored on each of ``maps`` ("map": nnUNetv2_predict; "own": each structure
    from its task's prediction; "merged": the all-task map of `nnunet-ext predict`)."""

    name: str
    trainer: str
    data: str = "source"
    maps: tuple[str, ...] = ("map",)


@dataclass(frozen=True)
class Comparison:
    kind: str  # the phantom
    first_id: int  # the seed's phantom is dataset first_id + seed
    models: tuple[Model, ...]
    methods: tuple[str, ...]  # model names
    baselines: tuple[tuple[str, str], ...]  # (model name, map) every method map is compared with
    every: int = 4  # the sparse phantom: every k-th axial slice annotated

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)

    def columns(self) -> list[tuple[str, str]]:
        return [(m.name, mode) for m in self.models for mode in m.maps]


MULTITASK_MAPS = ("own", "merged")
COMPARISONS = {
    "banet": Comparison(
        "full",
        930,
        (Model("nnUNetTrainer", "nnUNetTrainer"), Model("nnUNetTrainerBANet", "nnUNetTrainerBANet")),
        methods=("nnUNetTrainerBANet",),
        baselines=(("nnUNetTrainer", "map"),),
    ),
    "multitask": Comparison(
        "partial",
        940,
        (
            Model("nnUNetTrainerDoDNet", "nnUNetTrainerDoDNet", maps=MULTITASK_MAPS),
            Model("nnUNetTrainerTransDoDNet", "nnUNetTrainerTransDoDNet", maps=MULTITASK_MAPS),
            Model("nnUNetTrainerUniSeg", "nnUNetTrainerUniSeg", maps=MULTITASK_MAPS),
            Model("nnUNetTrainer_per_task", "nnUNetTrainer", data="per-task", maps=("own",)),
            Model("nnUNetTrainer_ignore", "nnUNetTrainer", data="ignore"),
        ),
        methods=("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet", "nnUNetTrainerUniSeg"),
        baselines=(("nnUNetTrainer_per_task", "own"), ("nnUNetTrainer_ignore", "map")),
    ),
}
LABELPROP_MODELS = (
    Model("a_ignore_label", "nnUNetTrainer"),  # the sparse slices, nnU-Net's ignore label elsewhere
    Model("b_nearest_1round", "nnUNetTrainer", data="recipe:nearest"),
    Model("c_shape_1round", "nnUNetTrainer", data="recipe:shape"),
    Model("d_fully_supervised", "nnUNetTrainer", data="dense"),
)
for _every, _first_id in ((4, 700), (8, 710)):
    COMPARISONS[f"labelprop{_every}"] = Comparison(
        "sparse",
        _first_id,
        LABELPROP_MODELS,
        methods=("b_nearest_1round", "c_shape_1round"),
        baselines=(("a_ignore_label", "map"), ("d_fully_supervised", "map")),
        every=_every,
    )
IGNORE_ID, TASK_ID = 950, 960  # derived datasets: 950 + seed; task i: 960 + 10 * i + seed
DENSE_ID = 720  # the sparse phantom's dense labels: 720 + seed (the same images and test cases at every k)
# `nnunet-ext labelprop run` of (every, method) writes ids N (interpolated) and N + 1 (pseudo-labelled),
# N = RECIPE_ID + 2 * seed
RECIPE_ID = {(4, "nearest"): 600, (4, "shape"): 620, (8, "nearest"): 640, (8, "shape"): 660}
# MedSeqFT: M_0 is the banet comparison's nnUNetTrainer of the seed; the task sequence of seed s is ids
# MEDSEQFT_ID + 3 * s + i (cases of phantom seeds 100 + 10 * s + i), planned with M_0's plans
MEDSEQFT_ID, MEDSEQFT_TASKS = 800, ("liver", "kidney", "spleen")
MEDSEQFT_METHODS, MEDSEQFT_BASELINES = ("medseqft", "medseqft_noexpert"), ("sequential", "parallel")
MAX_SEED = 9  # the ids above leave room for seeds 0-9
SCHEDULE = "converge"
CONFIGURATION = "3d_converge"  # the plans preset PRESET adds it: 3d_tiny's network on 16 x 32 x 32 crops
PRESET = "converge"
NSD_TOLERANCE_MM = 1.0
PLATEAU_SPREAD = 0.05  # max - min of a structure's pseudo Dice over the last 20% of epochs
PLATEAU_GAIN = 0.02  # mean of the last 20% minus the mean of the 20% before
LEARNED_MIN = 0.05  # a structure whose last 20% stay below this was never learned: flat, but not converged


@dataclass(frozen=True)
class Training:
    dataset_id: int
    dataset: Path
    task: str | None = None  # per-task baselines: the task this model is trained on


def plan(dataset_id: int, env: dict, log: Path) -> Path:
    """Plan and preprocess (stock CLI) and add 3d_converge (the plans preset), each step once; returns the plans file. A dataset with
    nnU-Net's ignore label gets its foreground intensities without the ignore voxels first (`nnunet-ext
    fingerprint`, docs/labelprop.md: nnU-Net 2.8 counts them as foreground, which skews CT normalisation), as
    the label-propagation recipe does for its own datasets, so the baselines are planned like the methods."""
    from nnunet_ext.core.nnunet_commands import nnunet_command, run_logged
    from nnunet_ext.planning.fingerprint import ignore_label_of
    from nnunet_ext.planning.plans import apply_preset, load_plans, save_plans

    dataset = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset_id:03d}_*"))
    plans_file = Path(env["nnUNet_preprocessed"]) / dataset.name / "nnUNetPlans.json"
    if not plans_file.is_file():
        if ignore_label_of(json.loads((dataset / "dataset.json").read_text())) is not None:
            cmd = [nnunet_command("nnUNetv2_extract_fingerprint"), "-d", str(dataset_id), "-np", "1"]
            run_logged([*cmd, "--verify_dataset_integrity"], env, log, quiet=True)
            cmd = [nnunet_command("nnunet-ext"), "fingerprint", "-d", str(dataset_id), "-np", "1"]
            run_logged([*cmd, "--no-extract"], env, log, quiet=True)
        cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres"]
        run_logged([*cmd, "-np", "1"], env, log, quiet=True)
    plans = load_plans(plans_file)
    if CONFIGURATION not in plans["configurations"]:
        apply_preset(plans, PRESET)
        save_plans(plans_file, plans)
    return plans_file


def prepare(
    workdir: Path, seed: int, kind: str, env: dict, log: Path, first_id: int = 930, every: int = 4
) -> tuple[int, Path]:
    """The seed's converge phantom, planned and preprocessed, with 3d_converge (each step once); the sparse one
    is not planned here (its models plan their own datasets)."""
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    dataset_id = first_id + seed
    raw = Path(env["nnUNet_raw"])
    if not list(raw.glob(f"Dataset{dataset_id}_*")):
        name = f"Converge{kind.title()}{every if kind == 'sparse' else ''}Seed{seed}"
        write_phantom_dataset(
            raw, dataset_id, kind=kind, name=name, num_train=16, num_test=8, seed=seed, every=every,
            profile="converge",
        )  # fmt: skip
    dataset = next(raw.glob(f"Dataset{dataset_id}_*"))
    if kind != "sparse":
        plan(dataset_id, env, log)
    return dataset_id, dataset


def write_derived(source: Path, dataset_id: int, variant: str) -> Path:
    """A baseline's training set from a phantom ``source`` (written beside it, images hard-linked). Of the
    partial phantom: ``ignore``: every training case, the structures its task does not annotate set to nnU-Net's
    ignore label (their place from the phantom's labelsTr_full/); ``task:<t>``: task t's cases only, its labels
    renumbered 1..n in the registry's order. Of the sparse phantom: ``dense``: every slice annotated (its
    labelsTr_dense/). The test cases stay in ``source`` (scored against its labelsTs/)."""
    import SimpleITK as sitk

    from nnunet_ext.core.datasets import RawDatasetWriter, read_label_array
    from nnunet_ext.multitask.tasks import load_task_registry

    dj = json.loads((source / "dataset.json").read_text())
    cases = sorted(f.name[: -len(".nii.gz")] for f in (source / "labelsTr").glob("*.nii.gz"))
    labels = {k: int(v) for k, v in dj["labels"].items()}
    if variant == "dense":
        name, keep = f"{source.name.split('_', 1)[1]}Dense", cases
        new_labels = {k: v for k, v in labels.items() if k != "ignore"}
        with RawDatasetWriter(source.parent, dataset_id, name, force=False) as writer:
            for case in keep:
                for image in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz")):
                    writer.add_file(image, "imagesTr", image.name, how="hardlink", case_id=case)
                label = source / "labelsTr_dense" / f"{case}.nii.gz"
                writer.add_file(label, "labelsTr", label.name, how="hardlink", case_id=case)
            derived = {k: v for k, v in dj.items() if k not in ("labels", "name", "nnunet_ext_phantom")}
            derived.update(labels=new_labels, name=f"Dataset{dataset_id:03d}_{name}")
            derived["nnunet_ext_converge"] = {"source": source.name, "variant": variant}
            return writer.finish(derived)
    registry = load_task_registry(dj, cases)
    if variant == "ignore":
        name, keep = f"{source.name.split('_', 1)[1]}Ignore", cases
        ignore = max(labels.values()) + 1  # nnU-Net: the ignore label is the highest
        new_labels = {**labels, "ignore": ignore}
    elif variant.startswith("task:") and variant[5:] in registry.tasks:
        task = variant[5:]
        name, keep = f"{source.name.split('_', 1)[1]}Task{task.title()}", registry.cases_by_task(cases)[task]
        lut = np.zeros(max(labels.values()) + 1, np.uint8)
        for i, value in enumerate(registry.labels_of(task)):
            lut[value] = i + 1
        new_labels = {"background": 0, **{n: i + 1 for i, n in enumerate(registry.label_names_of(task))}}
    else:
        raise ValueError(
            f"variant must be 'dense', 'ignore' or 'task:<one of {list(registry.tasks)}>', not {variant!r}"
        )
    raw = source.parent
    with RawDatasetWriter(raw, dataset_id, name, force=False) as writer:
        for case in keep:
            for image in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz")):
                writer.add_file(image, "imagesTr", image.name, how="hardlink", case_id=case)
            label_img = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
            label = sitk.GetArrayFromImage(label_img)
            if variant == "ignore":
                full = read_label_array(source / "labelsTr_full" / f"{case}.nii.gz")
                label = np.where((label == 0) & (full != 0), ignore, label).astype(np.uint8)
            else:
                label = lut[label]
            writer.write_label(label, label_img, case)
        derived = {
            k: v for k, v in dj.items() if k not in ("labels", "numTraining", "nnunet_ext_tasks", "name")
        }
        derived.update(labels=new_labels, numTraining=len(keep), name=f"Dataset{dataset_id:03d}_{name}")
        derived["nnunet_ext_converge"] = {"source": source.name, "variant": variant}
        return writer.finish(derived)


def trainings(
    workdir: Path, comparison: str, model: Model, seed: int, env: dict, log: Path
) -> tuple[Path, list[Training]]:
    """The seed's phantom (its test cases are scored) and the datasets ``model`` is trained on (written, planned
    and preprocessed when missing; a label-propagation recipe's datasets are written by the recipe itself, so
    they are returned only once it has run)."""
    spec = COMPARISONS[comparison]
    dataset_id, source = prepare(workdir, seed, spec.kind, env, log, spec.first_id, spec.every)
    if model.data == "source":
        plan(dataset_id, env, log)
        return source, [Training(dataset_id, source)]
    if model.data.startswith("recipe:"):
        first = RECIPE_ID[(spec.every, model.data[len("recipe:") :])] + 2 * seed
        raw = Path(env["nnUNet_raw"])
        found = [next(iter(raw.glob(f"Dataset{i:03d}_*")), None) for i in (first, first + 1)]
        if not all(found):
            return source, []
        return source, [Training(first, found[0], "model_A"), Training(first + 1, found[1], "model_B")]
    if model.data == "dense":
        variants = [(DENSE_ID + seed, "dense", None)]
    elif model.data == "ignore":
        variants = [(IGNORE_ID + seed, "ignore", None)]
    elif model.data == "per-task":
        tasks = list(json.loads((source / "dataset.json").read_text())["nnunet_ext_tasks"])
        variants = [(TASK_ID + 10 * i + seed, f"task:{t}", t) for i, t in enumerate(tasks)]
    else:
        raise ValueError(f"unknown data {model.data!r} of model {model.name}")
    out = []
    for derived_id, variant, task in variants:
        found = list(source.parent.glob(f"Dataset{derived_id:03d}_*"))
        dataset = found[0] if found else write_derived(source, derived_id, variant)
        plan(derived_id, env, log)
        out.append(Training(derived_id, dataset, task))
    return source, out


def plateau(dice_per_epoch: list[list[float]], names: list[str]) -> dict:
    """Per structure: the last 20% of epochs' mean, spread (max - min) and gain over the 20% before; plateaued
    when flat (spread and gain within the limits) and learned (mean at least LEARNED_MIN)."""
    d = np.asarray(dice_per_epoch, dtype=float)
    n = max(1, len(d) // 5)
    last, before = d[-n:], d[-2 * n : -n] if len(d) >= 2 * n else d[:n]
    out = {}
    for i, name in enumerate(names):
        spread = float(last[:, i].max() - last[:, i].min())
        gain = float(last[:, i].mean() - before[:, i].mean())
        out[name] = {
            "mean_last_20pct": float(last[:, i].mean()),
            "spread_last_20pct": spread,
            "gain_vs_previous_20pct": gain,
        }
        out[name]["plateaued"] = converged(out[name])
    return out


def converged(structure: dict) -> bool:
    """A structure's plateau verdict under this version's rule (results written before the rule changed carry
    the numbers it needs)."""
    if "mean_last_20pct" not in structure:
        return bool(structure["plateaued"])
    return bool(
        structure["spread_last_20pct"] <= PLATEAU_SPREAD
        and structure["gain_vs_previous_20pct"] <= PLATEAU_GAIN
        and structure["mean_last_20pct"] >= LEARNED_MIN
    )


def learning_curve(checkpoint: Path, names: list[str], title: str, png: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    logging = ckpt["logging"]
    dice = [[float(v) for v in epoch] for epoch in logging["dice_per_class_or_region"]]
    if dice and len(dice[0]) != len(names):  # a network whose outputs are not the dataset's labels
        names = [f"output {i + 1}" for i in range(len(dice[0]))]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(1, len(dice) + 1)
    for i, name in enumerate(names):
        ax[0].plot(x, [e[i] for e in dice], label=name)
    ax[0].axvspan(0.8 * len(dice), len(dice), color="0.9")
    ax[0].set(xlabel="epoch", ylabel="validation pseudo Dice", ylim=(0, 1))
    ax[0].legend(fontsize=8)
    ax[1].plot(x, [float(v) for v in logging["train_losses"]], label="train")
    ax[1].plot(x, [float(v) for v in logging["val_losses"]], label="validation")
    ax[1].set(xlabel="epoch", ylabel="loss")
    ax[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return {"epochs": len(dice), "plateau": plateau(dice, names)}


def structures(dataset: Path) -> dict[str, int]:
    """A dataset's labels without background and ignore."""
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    return {k: int(v) for k, v in labels.items() if k not in ("background", "ignore")}


def evaluate(dataset: Path, sources: dict[str, tuple[Path, int]]) -> dict:
    """Dice, HD95 and NSD per test case of ``dataset`` (its labelsTs/) and structure; ``sources``: structure ->
    (folder of predicted label maps, the structure's value there)."""
    import SimpleITK as sitk

    from nnunet_ext.core.metrics import dice, hd95, normalized_surface_dice

    labels = structures(dataset)
    cases = {}
    for gt_file in sorted((dataset / "labelsTs").glob("*.nii.gz")):
        gt_img = sitk.ReadImage(str(gt_file))
        gt = sitk.GetArrayFromImage(gt_img)
        spacing = gt_img.GetSpacing()[::-1]
        maps: dict[Path, np.ndarray] = {}
        cases[gt_file.name] = {}
        for name, value in labels.items():
            folder, predicted = sources[name]
            if folder not in maps:
                maps[folder] = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / gt_file.name)))
            p, g = maps[folder] == predicted, gt == value
            nsd = normalized_surface_dice(p, g, spacing, NSD_TOLERANCE_MM) if p.any() and g.any() else 0.0
            cases[gt_file.name][name] = {"Dice": dice(p, g), "HD95": hd95(p, g, spacing), "NSD": nsd}
    mean = {
        name: {m: float(np.mean([c[name][m] for c in cases.values()])) for m in ("Dice", "HD95", "NSD")}
        for name in labels
    }
    return {"cases": cases, "mean": mean}


def benchmark_env(workdir: Path, device: str) -> dict:
    """nnU-Net's folders under ``workdir``, our trainers findable, one torch thread, one augmentation worker,
    one process for nnU-Net's exports (the final validation, predictions)."""
    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    env = ext_trainer_env()
    for var, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "results"),
    ):
        env[var] = str(workdir / sub)
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"))
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_compile", "f" if device == "cpu" else "t")
    return env


def ext_predict_command(images: Path, out: Path, dataset_id: int, trainer: str, device: str, *extra) -> list:
    """`nnunet-ext predict` (multi-task models: the merged map, or with --per-task one map per task)."""
    from nnunet_ext.core.nnunet_commands import nnunet_command

    return [
        nnunet_command("nnunet-ext"), "predict", "-i", str(images), "-o", str(out), "-d", str(dataset_id),
        "-c", CONFIGURATION, "-tr", trainer, "-f", "0", "-device", device, *extra,
    ]  # fmt: skip


def predict_once(out: Path, folders: list[Path], n_test: int, cmd: list[str], env: dict, log: Path) -> None:
    """Run ``cmd`` unless every folder in ``folders`` holds ``n_test`` label maps (a partial output is
    removed first: it is ours, under the workdir)."""
    from nnunet_ext.core.nnunet_commands import run_logged

    if all(len(list(f.glob("*.nii.gz"))) >= n_test for f in folders):
        return
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_logged(cmd, env, log, quiet=True)


def model_folder(workdir: Path, dataset: str, trainer: str) -> Path:
    """Where nnU-Net writes fold 0 of ``trainer`` on ``dataset`` (its folder name) in the workdir."""
    return workdir / "results" / dataset / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / "fold_0"


def timed_run(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run ``cmd`` (logged); its wall seconds and the CPU seconds of it and its children (a training's
    augmentation workers included)."""
    from nnunet_ext.core.nnunet_commands import run_logged

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = run_logged(cmd, env, log, quiet=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def tag(comparison: str, seed: int, schedule: str = SCHEDULE) -> str:
    """The name stem of a seed's result files (a schedule other than ``converge``, e.g. a smoke run of the
    protocol, keeps its results apart)."""
    return f"{comparison}_seed{seed}" + ("" if schedule == SCHEDULE else f"_{schedule}")


def run(
    workdir: Path, comparison: str, seed: int, model_name: str, device: str, schedule: str = SCHEDULE
) -> dict:
    """One model trained (one training per dataset of :func:`trainings`), predicted and evaluated on every map
    it is scored on; each step is skipped when its output exists."""
    from nnunet_ext.core.nnunet_commands import predict_command, train_command

    spec = COMPARISONS[comparison]
    model = spec.model(model_name)
    stem = tag(comparison, seed, schedule)
    result_file = workdir / "runs" / f"{stem}_{model.name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    env = benchmark_env(workdir, device)
    log = workdir / f"{comparison}_seed{seed}.log"
    source, trained = trainings(workdir, comparison, model, seed, env, log)
    name = f"{model.trainer}_{schedule}"
    record = {"comparison": comparison, "seed": seed, "model": model.name, "trainer": model.trainer}
    record.update(schedule=schedule, trainings=[], test={})
    recipe = {}
    if model.data.startswith("recipe:"):
        recipe = run_recipe(workdir, spec, seed, model, trained, name, device, env, log)
        source, trained = trainings(workdir, comparison, model, seed, env, log)
    for t in trained:
        folder = model_folder(workdir, t.dataset.name, name)
        entry = {"dataset": t.dataset.name, "task": t.task}
        if recipe and t is trained[-1]:
            entry.update(recipe)  # the whole recipe's time: interpolation, model A, pseudo-labels, model B
        elif recipe:
            entry["cpu_in"] = "model_B (the whole recipe)"
        elif not (folder / "checkpoint_final.pth").is_file():
            # an interrupted training continues from its last checkpoint
            resume = ["--c"] if (folder / "checkpoint_latest.pth").is_file() else []
            entry["resumed"] = bool(resume)
            cmd = train_command(t.dataset_id, CONFIGURATION, 0, name, device, *resume)
            entry["train_wall_s"], entry["train_cpu_s"] = timed_run(cmd, env, log)
        suffix = f"_{t.task}" if t.task else ""
        entry["training"] = learning_curve(
            folder / "checkpoint_final.pth",
            list(structures(t.dataset)),
            f"{name}, {CONFIGURATION}, {t.dataset.name} (fold 0)",
            workdir / "curves" / f"{stem}_{model.name}{suffix}.png",
        )
        record["trainings"].append(entry)
    images, truth = source / "imagesTs", structures(source)
    n_test = len(list((source / "labelsTs").glob("*.nii.gz")))
    for mode in model.maps:
        out = workdir / "predictions" / stem / model.name / mode
        sources: dict[str, tuple[Path, int]] = {}
        if mode == "own" and model.data == "per-task":  # each task's plain model, its labels renumbered
            for t in trained:
                cmd = predict_command(images, out / t.task, t.dataset_id, CONFIGURATION, 0, name, device)
                predict_once(out / t.task, [out / t.task], n_test, cmd, env, log)
                sources.update({n: (out / t.task, v) for n, v in structures(t.dataset).items()})
        elif mode == "own":  # a multi-task model: one map per task, unified label values
            tasks = json.loads((source / "dataset.json").read_text())["nnunet_ext_tasks"]
            cmd = ext_predict_command(images, out, trained[0].dataset_id, name, device, "--per-task")
            predict_once(out, [out / task for task in tasks], n_test, cmd, env, log)
            sources = {n: (out / task, truth[n]) for task, spec_ in tasks.items() for n in spec_["labels"]}
        elif mode in ("map", "merged"):
            t = trained[-1]  # a recipe: its last model
            if mode == "map":
                cmd = predict_command(images, out, t.dataset_id, CONFIGURATION, 0, name, device)
            else:
                cmd = ext_predict_command(images, out, t.dataset_id, name, device)
            predict_once(out, [out], n_test, cmd, env, log)
            sources = {n: (out, v) for n, v in structures(t.dataset).items()}
        else:
            raise ValueError(f"unknown map {mode!r} of model {model.name}")
        record["test"][mode] = evaluate(source, sources)
    atomic_write_json(result_file, record)
    return record


def run_recipe(
    workdir: Path, spec: Comparison, seed: int, model: Model, trained: list, trainer: str, device: str, env: dict,
    log: Path,
) -> dict:  # fmt: skip
    """`nnunet-ext labelprop run` on the seed's sparse phantom (as a user types it: interpolation with the model's
    method, model A, pseudo-labels of the unannotated slices, model B; fold 0, ``trainer`` for both models),
    unless model B has finished; an interrupted recipe resumes from its state file. Returns the time it took
    (nothing when it had finished before)."""
    from nnunet_ext.core.nnunet_commands import nnunet_command

    method = model.data[len("recipe:") :]
    first = RECIPE_ID[(spec.every, method)] + 2 * seed
    if (
        trained
        and (model_folder(workdir, trained[-1].dataset.name, trainer) / "checkpoint_final.pth").is_file()
    ):
        return {}
    state = workdir / "runs" / f"labelprop_recipe_{first}.json"
    resumed = state.is_file()  # an earlier, interrupted run: the time below covers the rest only
    cmd = [
        nnunet_command("nnunet-ext"), "labelprop", "run", str(spec.first_id + seed), "--out-id", str(first),
        "--method", method, "-c", CONFIGURATION, "--plans-preset", PRESET, "--trainer-a", trainer, "--trainer-b", trainer, "-f", "0",
        "-device", device, "-np", "1", "--qc-cases", "0", "--state", str(state),
    ]  # fmt: skip
    state.parent.mkdir(parents=True, exist_ok=True)
    wall, cpu = timed_run(cmd, env, log)
    return {"train_wall_s": wall, "train_cpu_s": cpu, "resumed": resumed, "cpu_covers": "the whole recipe"}


def medseqft_tasks(workdir: Path, seed: int, m0_id: int, env: dict, log: Path) -> list[int]:
    """The seed's task sequence (`nnunet-ext medseqft phantoms --profile converge`, 16 training and 8 test
    cases per task), each planned with M_0's plans (`nnUNetv2_move_plans_between_datasets`, then
    `nnUNetv2_preprocess`), so that every task builds M_0's network; each step once."""
    from nnunet_ext.core.nnunet_commands import preprocess_with_plans_of, run_logged
    from nnunet_ext.medseqft.method import write_task_phantoms

    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    ids = [MEDSEQFT_ID + 3 * seed + i for i in range(len(MEDSEQFT_TASKS))]
    if not all(list(raw.glob(f"Dataset{i:03d}_*")) for i in ids):  # ours (the workdir): an interrupted write
        write_task_phantoms(
            raw, ids[0], MEDSEQFT_TASKS, num_train=16, num_test=8, seed=100 + 10 * seed, force=True,
            profile="converge",
        )  # fmt: skip
    for dataset_id in ids:
        dataset = next(raw.glob(f"Dataset{dataset_id:03d}_*"))
        data = pre / dataset.name / "nnUNetPlans_3d_fullres"  # 3d_converge shares 3d_fullres's data
        if len(list(data.glob("*.pkl"))) >= 16:
            continue
        preprocess_with_plans_of(m0_id, dataset_id, env, lambda cmd: run_logged(cmd, env, log, quiet=True))
    return ids


def run_medseqft(workdir: Path, seed: int, device: str, schedule: str = SCHEDULE) -> dict:
    """MedSeqFT (with and without its expert stage) vs sequential vs parallel full fine-tuning on the seed's
    task sequence from M_0 (the banet comparison's nnUNetTrainer, trained first when missing), with
    `nnunet-ext medseqft run ... --schedule converge` as a user types it (the trainers' default settings,
    the distillation weight included); the forgetting matrices and each training's plateau."""
    from nnunet_ext.core.nnunet_commands import nnunet_command

    stem = tag("medseqft", seed, schedule)
    result_file = workdir / "runs" / f"{stem}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    m0_run = run(workdir, "banet", seed, "nnUNetTrainer", device, schedule)  # kept and reused by banet
    env = benchmark_env(workdir, device)
    log = workdir / f"medseqft_seed{seed}.log"
    m0_dataset = m0_run["trainings"][0]["dataset"]
    m0_id = COMPARISONS["banet"].first_id + seed
    m0 = model_folder(workdir, m0_dataset, f"nnUNetTrainer_{schedule}")
    ids = medseqft_tasks(workdir, seed, m0_id, env, log)
    out = workdir / "medseqft" / stem
    state = out / "medseqft_run.json"
    resumed = state.is_file()
    cmd = [
        nnunet_command("nnunet-ext"), "medseqft", "run", "--pretrained", str(m0 / "checkpoint_final.pth"),
        "-d", *map(str, ids), "-c", CONFIGURATION, "-o", str(out), "--schedule", schedule, "-device", device,
    ]  # fmt: skip
    wall, cpu = timed_run(cmd, env, log)
    result = json.loads(state.read_text())
    record = {"comparison": "medseqft", "seed": seed, "schedule": schedule, "m0": str(m0), "tasks": ids}
    record.update(train_wall_s=wall, train_cpu_s=cpu, resumed=resumed)
    record["strategies"] = {
        k: {key: v[key] for key in ("matrix", "final", "bwt")} for k, v in result["strategies"].items()
    }
    record["trainings"] = []
    for final in sorted(out.glob("*/*/*/fold_0/checkpoint_final.pth")):  # strategy/dataset/trainer/fold_0
        strategy, dataset, model = final.parts[-5:-2]
        trainer = model.split("__")[0]
        record["trainings"].append(
            {
                "task": f"{strategy} {dataset.split('_', 1)[1]} {trainer}",
                "training": learning_curve(
                    final,
                    list(structures(workdir / "raw" / dataset)),
                    f"{trainer}, {CONFIGURATION}, {dataset} ({strategy})",
                    workdir / "curves" / f"{stem}_{strategy}_{dataset}_{trainer}.png",
                ),
            }
        )
    atomic_write_json(result_file, record)
    return record


def mean_std(v: np.ndarray, sign: str = "") -> str:
    """``mean ± std`` over seeds; n/a when a value is not finite (e.g. the HD95 of an empty prediction)."""
    if not np.isfinite(v).all():
        return "n/a"
    return f"{float(np.round(np.mean(v), 3)) + 0.0:{sign}.3f} ± {np.std(v):.3f}"  # + 0.0: no "-0.000"


def medseqft_report(seeds: list[int], results: dict[int, dict]) -> str:
    """Markdown: per strategy, the final models' Dice on every task, the final mean Dice and the backward
    transfer (mean +- std over seeds), the paired differences of MedSeqFT's two variants against sequential
    and parallel fine-tuning, and each training's plateau."""
    done = [s for s in seeds if s in results]
    lines = [f"medseqft: seeds with the run finished: {done or 'none'} (of {seeds})", ""]
    if not done:
        return "\n".join(lines)
    runs = [
        (f"seed {seed} {t['task']}", t, [k for k, v in t["training"]["plateau"].items() if not converged(v)])
        for seed in done
        for t in results[seed]["trainings"]
    ]
    unfinished = [f"{what}: {', '.join(not_flat)}" for what, _, not_flat in runs if not_flat]
    if unfinished:
        lines += [
            "**Not every training reached its plateau, so the differences below do not rank the strategies.** "
            "Not converged (not flat over the last 20% of epochs, or never learned): "
            + "; ".join(unfinished)
            + ".",
            "",
        ]
    strategies = list(results[done[0]]["strategies"])
    n_tasks = len(results[done[0]]["strategies"][strategies[0]]["matrix"])

    def values(strategy: str) -> np.ndarray:  # seeds x (Dice of the final model on task 1..n, final, bwt)
        rows = []
        for seed in done:
            entry = results[seed]["strategies"][strategy]
            rows.append([*entry["matrix"][-1], entry["final"], entry["bwt"]])
        return np.asarray(rows, dtype=float)

    head = [
        f"task {i + 1} ({MEDSEQFT_TASKS[i] if i < len(MEDSEQFT_TASKS) else i + 1})" for i in range(n_tasks)
    ]
    lines += [
        "| strategy (Dice of the final model) | "
        + " | ".join(head)
        + " | final mean Dice | backward transfer |",
        "|---|" + "---|" * (n_tasks + 2),
    ]
    for strategy in strategies:
        v = values(strategy)
        signs = [""] * (n_tasks + 1) + ["+"]  # the backward transfer is a difference
        lines.append(
            f"| {strategy} | " + " | ".join(mean_std(v[:, i], signs[i]) for i in range(n_tasks + 2)) + " |"
        )
    for method in (m for m in MEDSEQFT_METHODS if m in strategies):
        for base in (b for b in MEDSEQFT_BASELINES if b in strategies):
            d = values(method) - values(base)
            lines.append(
                f"| {method} - {base} | "
                + " | ".join(mean_std(d[:, i], "+") for i in range(n_tasks + 2))
                + " |"
            )
    lines += ["", "| training | epochs | converged (last 20%: spread <= 0.05, gain <= 0.02, mean >= 0.05) |"]
    lines.append("|---|---|---|")
    for what, t, not_flat in runs:
        verdict = "all structures" if not not_flat else "not: " + ", ".join(not_flat)
        lines.append(f"| {what} | {t['training']['epochs']} | {verdict} |")
    cpu = [results[s].get("train_cpu_s") for s in done]
    lines += [
        "",
        "CPU time of `nnunet-ext medseqft run` per seed [min]: "
        + ", ".join(f"seed {s}: {c / 60:.0f}" + (" (resumed: last part only)" if results[s].get("resumed") else "")
                    for s, c in zip(done, cpu) if c is not None),
    ]  # fmt: skip
    return "\n".join(lines)


def normalised(record: dict) -> dict:
    """A result in this version's form (results of the first version: one training, one map)."""
    if "trainings" in record:
        return record
    keys = ("train_cpu_s", "train_wall_s", "resumed", "training")
    training = {"dataset": None, "task": None, **{k: record[k] for k in keys if k in record}}
    return {**record, "model": record["trainer"], "trainings": [training], "test": {"map": record["test"]}}


def column_name(model: str, mode: str) -> str:
    return model if mode == "map" else f"{model} ({mode})"


def report(workdir: Path, comparison: str, seeds: list[int], results: dict) -> str:
    """Markdown: per metric, each model map's mean +- std over seeds per structure, then the paired difference
    of every method map against every baseline map (mean +- std over seeds), then each training's length, CPU
    time and plateau."""
    spec = COMPARISONS[comparison]
    results = {k: normalised(v) for k, v in results.items()}
    names = [m.name for m in spec.models]
    done = [s for s in seeds if all((s, n) in results for n in names)]
    lines = [f"{comparison}: seeds with every model finished: {done or 'none'} (of {seeds})", ""]
    if not done:
        return "\n".join(lines)
    # (label, training, structures not converged) of every training of the finished seeds
    runs = [
        (f"seed {seed} {n}" + (f" {t['task']}" if t.get("task") else ""), t)
        for seed in done
        for n in names
        for t in results[(seed, n)]["trainings"]
    ]
    runs = [
        (what, t, [k for k, v in t["training"]["plateau"].items() if not converged(v)]) for what, t in runs
    ]
    unfinished = [f"{what}: {', '.join(not_flat)}" for what, _, not_flat in runs if not_flat]
    if unfinished:  # a difference between models that had not converged ranks nothing
        lines += [
            "**Not every training reached its plateau, so the differences below do not rank the models.** "
            "Not converged (not flat over the last 20% of epochs, or never learned): "
            + "; ".join(unfinished)
            + ".",
            "",
        ]
    first = results[(done[0], names[0])]["test"]
    structures_ = list(first[next(iter(first))]["mean"])

    def values(model: str, mode: str, s: str, metric: str) -> np.ndarray:
        return np.array(
            [results[(seed, model)]["test"][mode]["mean"][s][metric] for seed in done], dtype=float
        )

    for metric in ("Dice", "HD95", "NSD"):
        lines += [f"| {metric} | " + " | ".join(structures_) + " |", "|---|" + "---|" * len(structures_)]
        for model, mode in spec.columns():
            row = [mean_std(values(model, mode, s, metric)) for s in structures_]
            lines.append(f"| {column_name(model, mode)} | " + " | ".join(row) + " |")
        for method in spec.methods:
            for mode in spec.model(method).maps:
                for base, base_mode in spec.baselines:
                    diff = [
                        values(method, mode, s, metric) - values(base, base_mode, s, metric)
                        for s in structures_
                    ]
                    label = f"{column_name(method, mode)} - {column_name(base, base_mode)}"
                    lines.append(f"| {label} | " + " | ".join(mean_std(d, "+") for d in diff) + " |")
        lines.append("")
    lines.append(
        "| training | epochs | train CPU [min] | converged (last 20%: spread <= 0.05, gain <= 0.02, mean >= 0.05) |"
    )
    lines.append("|---|---|---|---|")
    for what, t, not_flat in runs:
        cpu = t.get("train_cpu_s")
        cpu_text = f"{cpu / 60:.0f}" if cpu is not None else "(earlier run)"
        if t.get("resumed"):
            cpu_text += " (resumed: last part only)"
        if t.get("cpu_covers"):
            cpu_text += f" ({t['cpu_covers']})"
        elif t.get("cpu_in"):
            cpu_text = f"in {t['cpu_in']}"
        lines.append(
            f"| {what} | {t['training']['epochs']} | {cpu_text} | "
            f"{'all structures' if not not_flat else 'not: ' + ', '.join(not_flat)} |"
        )
    return "\n".join(lines)


def seed_arg(value: str) -> int:
    seed = int(value)
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"seeds are 0-{MAX_SEED} (each seed has its own dataset ids), not {seed}"
        )
    return seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("comparison", choices=[*COMPARISONS, "medseqft"])
    parser.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="benchmark_workdir/converge")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--models",
        "--trainers",
        nargs="+",
        help="only these models of the comparison (e.g. to split the runs over two processes): "
        + "; ".join(f"{k}: {' '.join(m.name for m in c.models)}" for k, c in COMPARISONS.items()),
    )
    parser.add_argument(
        "--schedule",
        default=SCHEDULE,
        choices=list(SCHEDULES),
        help=f"the trainers' schedule variant (default {SCHEDULE}; smoke: a quick run of the whole protocol, "
        "results kept apart and meaningless as accuracy)",
    )
    parser.add_argument("--report-only", action="store_true", help="no training: the tables of finished runs")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only write, plan and preprocess each seed's datasets (run once before splitting the trainings over "
        "several processes with --models, so that they never prepare the same dataset at once)",
    )
    args = parser.parse_args(argv)
    if args.comparison == "medseqft":
        if args.models:
            parser.error(
                "medseqft runs every strategy in one `nnunet-ext medseqft run`; --models does not apply"
            )
        return main_medseqft(args)
    spec = COMPARISONS[args.comparison]
    names = [m.name for m in spec.models]
    unknown = sorted(set(args.models or []) - set(names))
    if unknown:
        parser.error(f"{args.comparison} has no model {', '.join(unknown)}; its models: {' '.join(names)}")
    workdir = Path(args.workdir).resolve()
    if args.prepare_only:
        env = benchmark_env(workdir, args.device)
        for seed in args.seeds:
            log = workdir / f"{args.comparison}_seed{seed}.log"
            for model in spec.models:
                source, trained = trainings(workdir, args.comparison, model, seed, env, log)
                print(f"seed {seed} {model.name}: {', '.join(t.dataset.name for t in trained)}")
        return 0
    chosen = [n for n in names if not args.models or n in args.models]
    results = {}
    for seed in args.seeds:
        for name in chosen:
            if not args.report_only:
                results[(seed, name)] = run(workdir, args.comparison, seed, name, args.device, args.schedule)
    for seed in args.seeds:  # runs finished by another process (other models or seeds)
        for name in names:
            file = workdir / "runs" / f"{tag(args.comparison, seed, args.schedule)}_{name}.json"
            if (seed, name) not in results and file.is_file():
                results[(seed, name)] = json.loads(file.read_text())
    write_report(workdir, args, report(workdir, args.comparison, args.seeds, results))
    return 0


def write_report(workdir: Path, args: argparse.Namespace, text: str) -> None:
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, device {args.device}"
    )
    report_file = (
        workdir / f"{args.comparison}{'' if args.schedule == SCHEDULE else '_' + args.schedule}_report.md"
    )
    atomic_write_text(report_file, f"machine: {machine}\n\n{text}\n")
    print(text)


def main_medseqft(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    if args.prepare_only:
        env = benchmark_env(workdir, args.device)
        for seed in args.seeds:
            log = workdir / f"medseqft_seed{seed}.log"
            m0_id, _ = prepare(workdir, seed, "full", env, log, COMPARISONS["banet"].first_id)
            print(f"seed {seed}: M_0 on {m0_id}, tasks {medseqft_tasks(workdir, seed, m0_id, env, log)}")
        return 0
    results = {}
    for seed in args.seeds:
        file = workdir / "runs" / f"{tag('medseqft', seed, args.schedule)}.json"
        if not args.report_only:
            results[seed] = run_medseqft(workdir, seed, args.device, args.schedule)
        elif file.is_file():
            results[seed] = json.loads(file.read_text())
    write_report(workdir, args, medseqft_report(args.seeds, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
