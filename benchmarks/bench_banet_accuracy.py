"""BA-Net vs plain nnU-Net accuracy on phantoms with adjacent structures, same iterations, several seeds.

    python benchmarks/bench_banet_accuracy.py --seeds 0 1 --schedule demo      # CPU: ~30-40 min
    python benchmarks/bench_banet_accuracy.py --seeds 0 1 2 --schedule demo --configuration 3d_fullres

For each seed: a full phantom (liver, kidney, spleen touching each other, tumours, vessels) generated with
that seed, planned and preprocessed with the stock CLI, the tiny configuration; then the stock
`nnUNetv2_train` for `nnUNetTrainer_<schedule>` and `nnUNetTrainerBANet_<schedule>` (identical schedule,
fold 0), `nnUNetv2_predict` of the test cases, and Dice + HD95 (nnunet_ext.core.metrics, MONAI) per structure.
Prints per-seed and mean tables; writes <workdir>/banet_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.core.io import atomic_write_json
from nnunet_ext.core.metrics import per_structure
from nnunet_ext.core.nnunet_commands import (
    ext_trainer_env,
    nnunet_command,
    predict_command,
    run_logged,
    train_command,
)
from nnunet_ext.planning.plans import load_plans, save_plans, tiny_configuration
from nnunet_ext.tools.phantoms import write_phantom_dataset


def evaluate(dataset: Path, predictions: Path) -> dict:
    labels = {k: v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items() if v != 0}
    cases = {}
    for gt_file in sorted((dataset / "labelsTs").glob("*.nii.gz")):
        gt_img = sitk.ReadImage(str(gt_file))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / gt_file.name)))
        cases[gt_file.name] = per_structure(
            pred, sitk.GetArrayFromImage(gt_img), labels, gt_img.GetSpacing()[::-1]
        )
    mean = {}
    for name in labels:
        dice = [c[name]["Dice"] for c in cases.values() if not math.isnan(c[name]["Dice"])]
        hd = [c[name]["HD95"] for c in cases.values()]
        mean[name] = {
            "Dice": float(np.mean(dice)) if dice else math.nan,
            "HD95": float(np.mean(hd)) if all(math.isfinite(h) for h in hd) else math.inf,
            "HD95_median": float(np.median(hd)),
        }
    return {"cases": cases, "mean": mean}


def run_seed(
    workdir: Path, seed: int, trainers: list[str], configuration: str, device: str, log: Path
) -> dict:
    dataset_id = 960 + seed
    raw, pre, res = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed", workdir / "nnUNet_results"
    env = ext_trainer_env()
    env.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
    env.setdefault("nnUNet_compile", "f" if device == "cpu" else "t")
    for folder in (raw, pre, res):
        folder.mkdir(parents=True, exist_ok=True)
    if not list(raw.glob(f"Dataset{dataset_id}_*")):
        write_phantom_dataset(
            raw, dataset_id, kind="full", name=f"PhantomSeed{seed}", num_train=16, num_test=6, seed=seed
        )
    dataset = next(raw.glob(f"Dataset{dataset_id}_*"))
    plans_file = pre / dataset.name / "nnUNetPlans.json"
    if not plans_file.is_file():
        run_logged(
            [
                nnunet_command("nnUNetv2_plan_and_preprocess"),
                "-d",
                str(dataset_id),
                "-c",
                "3d_fullres",
                "-np",
                "2",
            ],
            env,
            log,
            quiet=True,
        )
    plans = load_plans(plans_file)
    if configuration == "3d_tiny" and "3d_tiny" not in plans["configurations"]:
        tiny_configuration(plans)
        save_plans(plans_file, plans)
    results = {}
    for trainer in trainers:
        model = res / dataset.name / f"{trainer}__nnUNetPlans__{configuration}"
        seconds = None
        if not (model / "fold_0" / "checkpoint_final.pth").is_file():
            cmd = train_command(dataset_id, configuration, 0, trainer, device)
            seconds = run_logged(cmd, env, log, quiet=True)
        out = workdir / "predictions" / f"seed{seed}" / trainer
        if not out.is_dir() or len(list(out.glob("*.nii.gz"))) < len(
            list((dataset / "labelsTs").glob("*.nii.gz"))
        ):
            cmd = predict_command(dataset / "imagesTs", out, dataset_id, configuration, 0, trainer, device)
            run_logged(cmd, env, log, quiet=True)
        results[trainer] = {**evaluate(dataset, out), "train_seconds": seconds}
        print(
            f"seed {seed} {trainer}: "
            + ", ".join(
                f"{k} {v['Dice']:.3f}/{v['HD95']:.1f}mm" for k, v in results[trainer]["mean"].items()
            ),
            flush=True,
        )
    return results


def table(per_seed: dict, trainers: list[str]) -> str:
    structures = list(next(iter(next(iter(per_seed.values())).values()))["mean"])
    lines = [
        "| structure | " + " | ".join(f"{t} Dice | {t} HD95 [mm]" for t in trainers) + " |",
        "|---|" + "---|---|" * len(trainers),
    ]
    for s in structures:
        cells = []
        for t in trainers:
            dice = [per_seed[seed][t]["mean"][s]["Dice"] for seed in per_seed]
            hd = [per_seed[seed][t]["mean"][s]["HD95"] for seed in per_seed]
            cells.append(f"{np.mean(dice):.3f} ± {np.std(dice):.3f}")
            cells.append(
                f"{np.mean(hd):.1f} ± {np.std(hd):.1f}" if all(map(math.isfinite, hd)) else "inf (a miss)"
            )
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="benchmark_workdir/banet_accuracy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--schedule", default="demo", help="schedule variant of both trainers (demo, smoke)")
    parser.add_argument("--configuration", default="3d_tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    trainers = [f"nnUNetTrainer_{args.schedule}", f"nnUNetTrainerBANet_{args.schedule}"]
    per_seed = {
        seed: run_seed(workdir, seed, trainers, args.configuration, args.device, workdir / "bench.log")
        for seed in args.seeds
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, device {args.device}"
    print(
        f"\nmachine: {machine}; schedule {args.schedule}; configuration {args.configuration}; "
        f"seeds {args.seeds}; mean ± std over seeds of the per-seed test-case means"
    )
    print(table(per_seed, trainers))
    atomic_write_json(
        workdir / "banet_accuracy.json",
        {
            "machine": machine,
            "schedule": args.schedule,
            "configuration": args.configuration,
            "per_seed": per_seed,
        },
    )


if __name__ == "__main__":
    main()
