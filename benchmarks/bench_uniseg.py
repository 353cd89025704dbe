"""UniSeg benchmarks on the multi-task (partially labelled) phantom, nnU-Net's 3d_tiny configuration.

    python benchmarks/bench_uniseg.py                       # all parts, CPU defaults
    python benchmarks/bench_uniseg.py --parts speed infer   # skip the (slow) accuracy part
    python benchmarks/bench_uniseg.py --iterations 300 --device cuda

1. speed: `nnunet-ext bench` (nnunet_ext.tools.bench.run_benchmark): train-step time, peak memory and inference time per
   case of nnUNetTrainerUniSeg vs nnUNetTrainer on the same plans, measured in the same run (separate processes
   and interleaved in one process); the issue's target is a train-step ratio of at most 1.1.
2. infer: sliding-window inference time per case (nnU-Net's predictor, no mirroring) of all tasks in one call
   (encoder once, the T task decoder passes batched: ``UniSeg.forward_global``) vs one task vs T single-task
   calls.
3. accuracy: Dice per structure on the test cases (full truth in labelsTs) of UniSeg trained on all tasks vs plain
   nnU-Nets trained per task on that task's cases, with the same TOTAL number of iterations (each plain net
   gets 1/T of them). UniSeg (fold 'all', then the end-of-training validation that stores the cross-task
   weights) is scored three ways: each task's own prediction (``nnunet-ext predict --per-task``) on that task's
   labels, the comparison with the per-task nets; the merged map with exact decoding (``nnunet-ext predict``);
   the stock ``nnUNetv2_predict`` map. ``--accuracy-models`` picks the models, ``--reuse-trained`` scores an existing
   UniSeg checkpoint.

Uses the phantom and helpers of benchmarks/bench_dodnet.py (same workdir: the prepared data is shared).
Prints a machine line and the tables; writes <workdir>/bench_uniseg.json. Copy them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dodnet import (  # noqa: E402 (the sibling script's helpers)
    DATASET_ID,
    infer_times,
    machine,
    make_trainer,
    per_task_baselines,
    predictor_for,
    prepare,
    score_multitask,
    test_set,
    train,
)

TRAINER = "nnUNetTrainerUniSeg"


def part_speed(pre: Path, args) -> dict:
    from nnunet_ext.tools.bench import format_report, run_benchmark

    r = run_benchmark(
        pre / "nnUNetPlans.json", "3d_tiny", TRAINER, device=args.device, iterations=args.speed_iterations,
        warmup=2, cases=2, no_mirroring=True, rounds=args.rounds,
    )  # fmt: skip
    print(format_report(r), flush=True)
    return r


def part_infer(pre: Path, raw: Path, device: torch.device, repeats: int) -> dict:
    import SimpleITK as sitk

    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[:2]
    t = make_trainer(pre, TRAINER, device)
    t.initialize()
    p = predictor_for(t, device)
    data = [
        torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[None].astype(np.float32))
        for f in images
    ]
    times = infer_times(p, t.network, data, repeats)
    print(TRAINER, {k: f"{v:.2f} s/case" for k, v in times.items()}, flush=True)
    return times


def part_accuracy(
    pre: Path, raw: Path, workdir: Path, device, total_iterations: int, epochs: int, models, reuse: bool,
    seed: int = 0,
) -> dict:  # fmt: skip
    test_images, truths = test_set(raw)
    per_iter = max(1, total_iterations // epochs)
    results = {}
    if "uniseg" in models:
        model = workdir / "nnUNet_results" / pre.name / f"{TRAINER}__nnUNetPlans__3d_tiny"
        secs = None
        if not (reuse and (model / "fold_all" / "checkpoint_final.pth").is_file()):
            _, secs = train(pre, TRAINER, device, epochs, per_iter, seed=seed, validate=True)
            print(f"{TRAINER} trained in {secs:.0f} s", flush=True)
        results[TRAINER] = score_multitask(model, device, raw)
        results[TRAINER]["train_seconds"] = secs
        print(TRAINER, json.dumps(results[TRAINER]), flush=True)
    if "per-task" in models:
        results["nnUNetTrainer per task"] = per_task_baselines(
            workdir, raw, device, epochs, per_iter, test_images, truths
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="benchmark_workdir")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--parts", nargs="+", default=["speed", "infer", "accuracy"], choices=["speed", "infer", "accuracy"]
    )
    parser.add_argument("--speed-iterations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (0: skip)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--iterations", type=int, default=150, help="total training iterations (accuracy part)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="torch / numpy seed of the accuracy training")
    parser.add_argument(
        "--profile",
        default="standard",
        choices=["standard", "converge"],
        help="phantom profile (converge: the convergence benchmarks; the workdir's prepared data is reused)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 on a shared machine: read CPU-time rows)"
    )
    parser.add_argument(
        "--accuracy-models",
        nargs="+",
        default=["uniseg", "per-task"],
        choices=["uniseg", "per-task"],
        help="accuracy part: UniSeg and/or one plain nnUNetTrainer per task",
    )
    parser.add_argument(
        "--reuse-trained",
        action="store_true",
        help="accuracy part: score an existing UniSeg checkpoint_final instead of training again",
    )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).resolve()
    os.environ.setdefault("nnUNet_compile", "f")
    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    os.environ["nnUNet_extTrainer"] = ext_trainer_env()["nnUNet_extTrainer"]
    pre = prepare(workdir, DATASET_ID, profile=args.profile)
    raw = next((workdir / "nnUNet_raw").glob(f"Dataset{DATASET_ID:03d}_*"))
    print(f"machine: {machine()}", flush=True)
    report = {"machine": machine()}
    if "speed" in args.parts:
        report["speed"] = part_speed(pre, args)
    if "infer" in args.parts:
        report["inference"] = part_infer(pre, raw, device, args.repeats)
    if "accuracy" in args.parts:
        report["accuracy"] = part_accuracy(
            pre,
            raw,
            workdir,
            device,
            args.iterations,
            args.epochs,
            args.accuracy_models,
            args.reuse_trained,
            args.seed,
        )
    from nnunet_ext.core.io import atomic_write_json

    name = f"bench_uniseg_seed{args.seed}.json" if args.seed else "bench_uniseg.json"
    atomic_write_json(workdir / name, report)
    print(f"wrote {workdir / name}")


if __name__ == "__main__":
    main()
