"""Benchmark every method trainer against plain nnUNetTrainer on the same plans, in one run.

    python benchmarks/run_all.py                      # CPU: phantom, 3d_tiny
    python benchmarks/run_all.py --configuration 3d_fullres --device cuda --iterations 20

Creates (or reuses) a phantom dataset in --workdir, plans and preprocesses it with the stock nnU-Net
command, adds the tiny configuration, then runs `nnunet-ext bench` for each trainer: train-step time,
peak memory during training steps and sliding-window inference time per case, with ratios
trainer / nnUNetTrainer. Results are printed and written to <workdir>/bench-<trainer>-<cfg>.json; copy
the table into docs/benchmarks.md together with the machine line it prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import nnunet_ext.trainers as ours
from nnunet_ext.core.io import atomic_write_json
from nnunet_ext.planning.plans import load_plans, save_plans, tiny_configuration
from nnunet_ext.tools.bench import format_report, run_benchmark
from nnunet_ext.tools.phantoms import write_phantom_dataset

DATASET_ID = 980


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def prepare(workdir: Path) -> Path:
    raw, pre = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed"
    for folder in (raw, pre, workdir / "nnUNet_results"):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(workdir / "nnUNet_results")
    )
    if not list(raw.glob(f"Dataset{DATASET_ID}_*")):
        write_phantom_dataset(raw, DATASET_ID, kind="full", num_train=10, num_test=2, seed=0)
    plans_file = next(iter(pre.glob(f"Dataset{DATASET_ID}_*/nnUNetPlans.json")), None)
    if plans_file is None:
        exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
        subprocess.run([str(exe), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"], check=True)
        plans_file = next(pre.glob(f"Dataset{DATASET_ID}_*/nnUNetPlans.json"))
    plans = load_plans(plans_file)
    if "3d_tiny" not in plans["configurations"]:
        tiny_configuration(plans)
        save_plans(plans_file, plans)
    return plans_file


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="benchmark_workdir")
    parser.add_argument("--configuration", default="3d_tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (0: skip)")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 on a shared machine: read CPU-time rows)"
    )
    parser.add_argument("--trainers", nargs="+", default=[t.__name__ for t in ours.METHOD_TRAINERS])
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    plans_file = prepare(workdir)
    print(f"machine: {machine()}")
    for trainer in args.trainers:
        r = run_benchmark(
            plans_file,
            args.configuration,
            trainer,
            device=args.device,
            iterations=args.iterations,
            warmup=args.warmup,
            cases=args.cases,
            rounds=args.rounds,
            steps_per_round=args.steps_per_round,
            threads=args.threads,
        )
        r["machine"] = machine()
        print(format_report(r))
        atomic_write_json(workdir / f"bench-{trainer}-{args.configuration}.json", r)


if __name__ == "__main__":
    main()
