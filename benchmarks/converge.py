"""Accuracy at convergence (issue 20): a method and its baseline trained to the same plateau, over seeds.

    python benchmarks/converge.py banet --seeds 0 1 2                  # BA-Net vs nnUNetTrainer
    python benchmarks/converge.py banet --seeds 0 1 2 --report-only    # tables from what has finished

Data: `nnunet-ext phantoms full --profile converge` (one dataset per seed, id 930 + seed: the seed changes the
cases, the split and the initialisation), planned with the stock CLI, the tiny configuration. Every model is
the stock `nnUNetv2_train DATASET 3d_tiny 0 -tr <Trainer>_converge` (60 epochs x 50 iterations: plain
nnUNetTrainer plateaus on every structure by ~3000 iterations there), one torch thread per run
(OMP_NUM_THREADS=1, held through benchmarks/nnunet_train_threads.py: the stock nnUNetv2_train -device cpu
asks for every core), so two runs of this script (other seeds) can share a 2-core machine. Then
`nnUNetv2_predict` on the test cases and, per structure, Dice, HD95 and the normalised surface Dice at 1 mm
(nnunet_ext.core.metrics: MONAI surfaces, DeepMind's NSD definition).

Resumable: a finished training (checkpoint_final.pth), prediction or evaluation is never redone, an
interrupted training continues from its checkpoint_latest.pth (`nnUNetv2_train --c`), and each run's result is
written as soon as it exists (<workdir>/runs/<comparison>_seed<S>_<trainer>.json). Its CPU time then covers the
last invocation only (recorded as "resumed"). For every run it records the training length, the CPU time of the
training command, whether the validation pseudo Dice had plateaued (per structure: the spread of its last 20%
of epochs and the change of their mean against the 20% before) and a learning-curve PNG. The report: per
structure, mean +- std over seeds of each trainer and the paired difference (method - baseline) with its std.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np

from nnunet_ext.core.io import atomic_write_json, atomic_write_text

# comparison -> (phantom kind, baseline trainer, method trainers)
COMPARISONS = {"banet": ("full", "nnUNetTrainer", ["nnUNetTrainerBANet"])}
SCHEDULE = "converge"
CONFIGURATION = "3d_tiny"
NSD_TOLERANCE_MM = 1.0
PLATEAU_SPREAD = 0.05  # max - min of a structure's pseudo Dice over the last 20% of epochs
PLATEAU_GAIN = 0.02  # mean of the last 20% minus the mean of the 20% before


def prepare(workdir: Path, seed: int, kind: str, env: dict, log: Path) -> tuple[int, Path]:
    """The seed's converge phantom, planned and preprocessed, with 3d_tiny (each step once)."""
    from nnunet_ext.core.nnunet_commands import nnunet_command, run_logged
    from nnunet_ext.planning.plans import load_plans, save_plans, tiny_configuration
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    dataset_id = 930 + seed
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    if not list(raw.glob(f"Dataset{dataset_id}_*")):
        write_phantom_dataset(
            raw, dataset_id, kind=kind, name=f"Converge{kind.title()}Seed{seed}", num_train=16, num_test=8,
            seed=seed, profile="converge",
        )  # fmt: skip
    dataset = next(raw.glob(f"Dataset{dataset_id}_*"))
    plans_file = pre / dataset.name / "nnUNetPlans.json"
    if not plans_file.is_file():
        cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres"]
        run_logged([*cmd, "-np", "1"], env, log, quiet=True)
    plans = load_plans(plans_file)
    if CONFIGURATION not in plans["configurations"]:
        tiny_configuration(plans)
        save_plans(plans_file, plans)
    return dataset_id, dataset


def plateau(dice_per_epoch: list[list[float]], names: list[str]) -> dict:
    """Per structure: the last 20% of epochs' mean, spread (max - min) and gain over the 20% before."""
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
            "plateaued": bool(spread <= PLATEAU_SPREAD and gain <= PLATEAU_GAIN),
        }
    return out


def learning_curve(checkpoint: Path, names: list[str], title: str, png: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    logging = ckpt["logging"]
    dice = [[float(v) for v in epoch] for epoch in logging["dice_per_class_or_region"]]
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


def evaluate(dataset: Path, predictions: Path) -> dict:
    import SimpleITK as sitk

    from nnunet_ext.core.metrics import normalized_surface_dice, per_structure

    labels = {k: v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items() if v}
    cases = {}
    for gt_file in sorted((dataset / "labelsTs").glob("*.nii.gz")):
        gt_img = sitk.ReadImage(str(gt_file))
        gt = sitk.GetArrayFromImage(gt_img)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / gt_file.name)))
        spacing = gt_img.GetSpacing()[::-1]
        cases[gt_file.name] = per_structure(pred, gt, labels, spacing)  # Dice, HD95
        for name, value in labels.items():  # + NSD at the tolerance
            p, g = pred == value, gt == value
            nsd = normalized_surface_dice(p, g, spacing, NSD_TOLERANCE_MM) if p.any() and g.any() else 0.0
            cases[gt_file.name][name]["NSD"] = nsd
    mean = {
        name: {m: float(np.mean([c[name][m] for c in cases.values()])) for m in ("Dice", "HD95", "NSD")}
        for name in labels
    }
    return {"cases": cases, "mean": mean}


def benchmark_env(workdir: Path, device: str) -> dict:
    """nnU-Net's folders under ``workdir``, our trainers findable, one torch thread, one augmentation worker."""
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
    env.setdefault("nnUNet_compile", "f" if device == "cpu" else "t")
    return env


def threaded_train() -> list[str]:
    """``nnUNetv2_train`` held to OMP_NUM_THREADS torch threads (benchmarks/nnunet_train_threads.py: the stock
    entry point asks for every core with ``-device cpu``, and two such runs on two cores crawl)."""
    return [sys.executable, str(Path(__file__).with_name("nnunet_train_threads.py"))]


def run(workdir: Path, comparison: str, seed: int, trainer: str, device: str) -> dict:
    """One trained, predicted and evaluated model (each step skipped when its output exists)."""
    from nnunet_ext.core.nnunet_commands import predict_command, run_logged, train_command

    result_file = workdir / "runs" / f"{comparison}_seed{seed}_{trainer}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    kind = COMPARISONS[comparison][0]
    env = benchmark_env(workdir, device)
    log = workdir / f"{comparison}_seed{seed}.log"
    dataset_id, dataset = prepare(workdir, seed, kind, env, log)
    name = f"{trainer}_{SCHEDULE}"
    model = workdir / "results" / dataset.name / f"{name}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    record = {"comparison": comparison, "seed": seed, "trainer": trainer, "schedule": SCHEDULE}
    if not (model / "checkpoint_final.pth").is_file():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        resume = ["--c"] if (model / "checkpoint_latest.pth").is_file() else []  # an interrupted training
        record["resumed"] = bool(resume)
        cmd = train_command(dataset_id, CONFIGURATION, 0, name, device, *resume)
        record["train_wall_s"] = run_logged([*threaded_train(), *cmd[1:]], env, log, quiet=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the training and its augmentation workers
        record["train_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = workdir / "predictions" / f"{comparison}_seed{seed}" / trainer
    n_test = len(list((dataset / "labelsTs").glob("*.nii.gz")))
    if len(list(out.glob("*.nii.gz"))) < n_test:
        cmd = predict_command(dataset / "imagesTs", out, dataset_id, CONFIGURATION, 0, name, device)
        run_logged(cmd, env, log, quiet=True)
    names = [k for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items() if v]
    title = f"{name}, {CONFIGURATION}, {dataset.name} (fold 0)"
    record["training"] = learning_curve(
        model / "checkpoint_final.pth",
        names,
        title,
        workdir / "curves" / f"{comparison}_seed{seed}_{trainer}.png",
    )
    record["test"] = evaluate(dataset, out)
    atomic_write_json(result_file, record)
    return record


def report(workdir: Path, comparison: str, seeds: list[int], results: dict) -> str:
    """Markdown: per structure and metric, each trainer's mean +- std over seeds and the paired difference."""
    _, baseline, methods = COMPARISONS[comparison]
    trainers = [baseline, *methods]
    done = [s for s in seeds if all((s, t) in results for t in trainers)]
    lines = [f"{comparison}: seeds with every model finished: {done or 'none'} (of {seeds})", ""]
    if not done:
        return "\n".join(lines)
    structures = list(results[(done[0], baseline)]["test"]["mean"])
    for metric in ("Dice", "HD95", "NSD"):
        head = " | ".join(trainers) + " | " + " | ".join(f"{m} - {baseline}" for m in methods)
        lines += [f"| {metric} | {head} |", "|---|" + "---|" * (len(trainers) + len(methods))]
        for s in structures:
            values = {t: [results[(seed, t)]["test"]["mean"][s][metric] for seed in done] for t in trainers}
            cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in values.values()]
            for m in methods:
                diff = np.subtract(values[m], values[baseline])
                cells.append(
                    f"{np.mean(diff):+.3f} ± {np.std(diff):.3f}" if np.isfinite(diff).all() else "n/a"
                )
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| run | epochs | train CPU [min] | plateaued (last 20%: spread <= 0.05, gain <= 0.02) |")
    lines.append("|---|---|---|---|")
    for seed in done:
        for t in trainers:
            r = results[(seed, t)]
            flat = r["training"]["plateau"]
            not_flat = [k for k, v in flat.items() if not v["plateaued"]]
            cpu = r.get("train_cpu_s")
            cpu_text = f"{cpu / 60:.0f}" if cpu is not None else "(earlier run)"
            lines.append(
                f"| seed {seed} {t} | {r['training']['epochs']} | {cpu_text} | "
                f"{'all structures' if not not_flat else 'not: ' + ', '.join(not_flat)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("comparison", choices=list(COMPARISONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="benchmark_workdir/converge")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--trainers", nargs="+", help="only these trainers of the comparison (e.g. to split runs)"
    )
    parser.add_argument("--report-only", action="store_true", help="no training: the tables of finished runs")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only write, plan and preprocess each seed's phantom (run once before splitting the trainings over "
        "several processes with --trainers, so that they never prepare the same dataset at once)",
    )
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    if args.prepare_only:
        kind = COMPARISONS[args.comparison][0]
        env = benchmark_env(workdir, args.device)
        for seed in args.seeds:
            _, dataset = prepare(workdir, seed, kind, env, workdir / f"{args.comparison}_seed{seed}.log")
            print(f"seed {seed}: {dataset}")
        return 0
    _, baseline, methods = COMPARISONS[args.comparison]
    trainers = [t for t in (baseline, *methods) if not args.trainers or t in args.trainers]
    results = {}
    for seed in args.seeds:
        for trainer in trainers:
            file = workdir / "runs" / f"{args.comparison}_seed{seed}_{trainer}.json"
            if args.report_only:
                if file.is_file():
                    results[(seed, trainer)] = json.loads(file.read_text())
                continue
            results[(seed, trainer)] = run(workdir, args.comparison, seed, trainer, args.device)
    for seed in args.seeds:  # runs finished by another process (other trainers or seeds)
        for trainer in (baseline, *methods):
            file = workdir / "runs" / f"{args.comparison}_seed{seed}_{trainer}.json"
            if (seed, trainer) not in results and file.is_file():
                results[(seed, trainer)] = json.loads(file.read_text())
    text = report(workdir, args.comparison, args.seeds, results)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, device {args.device}"
    )
    atomic_write_text(workdir / f"{args.comparison}_report.md", f"machine: {machine}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
