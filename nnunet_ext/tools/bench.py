"""Benchmark harness: ``nnunet-ext bench``.

For a trainer and a configuration, measure against a baseline (plain ``nnUNetTrainer``) on the SAME
plans, in the same run:

* train-step time: ``trainer.train_step(batch)`` (forward, loss, backward, optimizer step) on real
  augmented batches of the preprocessed dataset, fetched before timing; warm-up steps are not counted.
  Measured twice: once per trainer in its own fresh process, and INTERLEAVED: one process holds both
  trainers and alternates rounds of steps (baseline, trainer, trainer, baseline, ...); the reported ratio is
  the median of the per-round ratios, so load that drifts on a shared machine affects both sides alike;
* peak memory during those steps: CUDA ``max_memory_allocated``, or on CPU the growth of the process's
  peak resident memory over its size before the steps (each trainer runs in its own fresh process, so
  one cannot hide the other's peak). CPU RSS is a poor proxy for GPU memory, so every run also reports a
  device-independent estimate of training memory: parameters + gradients + optimizer state + the tensors
  autograd saves for backward in one train step (unique storages, counted with saved-tensor hooks);
* sliding-window inference time per case with nnU-Net's predictor (Gaussian weighting, mirroring as
  nnU-Net does) on preprocessed validation cases.

It prints the measurements and the ratios trainer / baseline, and writes them as JSON with ``--json``.
Trainer output folders go to a temporary nnUNet_results; nothing in the user's folders changes except
nnU-Net's own ``splits_final.json``, created as nnU-Net would if it was missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.inference import torch_device
from nnunet_ext.core.nnunet_commands import count_arg, device_arg


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_trainer(options: dict, name: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_ext.core.nnunet_commands import find_trainer

    plans_file = Path(options["plans_file"])
    plans = load_json(str(plans_file))
    plans["continue_training"] = False
    trainer = find_trainer(name)(
        plans=plans,
        configuration=options["configuration"],
        fold=options["fold"],
        dataset_json=load_json(str(plans_file.parent / "dataset.json")),
        device=torch.device(options["device"]),
    )
    trainer.initialize()
    trainer.network.train()
    return trainer


def _fetch_batches(trainer, n: int) -> list:
    dl_train, _ = trainer.get_dataloaders()
    return [next(dl_train) for _ in range(n)]


def training_memory_estimate(trainer, batch) -> dict:
    """Device-independent training memory of one train step, in MiB.

    ``state``: parameters + gradients + optimizer state tensors; ``activations``: unique storages of the
    tensors autograd saves for backward during the step (what a GPU must hold at the peak, between the
    forward and the backward pass). Runs one real ``train_step`` (it updates the weights like any step).
    """
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step(batch)
    params = list(trainer.network.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt_bytes = sum(
        v.numel() * v.element_size()
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    state_mb = (param_bytes + grad_bytes + opt_bytes) / 2**20
    act_mb = sum(storages.values()) / 2**20
    return {
        "state_memory_mb": state_mb,
        "activation_memory_mb": act_mb,
        "memory_estimate_mb": state_mb + act_mb,
    }


def train_step_flops(trainer, batch) -> float:
    """Floating-point operations of one ``train_step`` (forward, loss, backward), counted by
    ``torch.utils.flop_counter`` (matrix multiplies and convolutions, the work that dominates a step); a
    device- and load-independent measure of compute. Runs one real step."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return float(counter.get_total_flops())


def _timed_steps(trainer, batches, device) -> tuple[float, float]:
    """Mean wall-clock and process CPU seconds per train step (CPU time: the whole process, all threads)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(batches), (time.process_time() - cpu_start) / len(batches)


def _set_threads(options: dict) -> None:
    if options.get("threads"):
        import torch

        torch.set_num_threads(int(options["threads"]))


def measure_interleaved(options: dict) -> dict:
    """Run in a fresh process: baseline and trainer in ONE process, train steps in alternating rounds.

    Round r times ``steps_per_round`` steps of each trainer, the order alternating (ABBA) so neither side
    always runs first; the ratio is the median over rounds of trainer / baseline, robust to load drift.
    """
    import statistics

    import torch

    torch.manual_seed(options.get("seed", 0))
    _set_threads(options)
    device = torch.device(options["device"])
    names = [options["baseline"], options["trainer"]]
    trainers = {n: _make_trainer(options, n) for n in names}
    k, rounds, warmup = options["steps_per_round"], options["rounds"], options["warmup"]
    batches = {n: _fetch_batches(t, warmup + k) for n, t in trainers.items()}
    for n, t in trainers.items():
        for batch in batches[n][:warmup]:
            t.train_step(batch)
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            wall, cpu = _timed_steps(trainers[n], batches[n][warmup:], device)
            times[n].append(wall)
            cpu_times[n].append(cpu)
    ratios = [t / b for b, t in zip(times[names[0]], times[names[1]], strict=True)]
    cpu_ratios = [t / b for b, t in zip(cpu_times[names[0]], cpu_times[names[1]], strict=True)]
    return {
        "baseline_step_s": statistics.median(times[names[0]]),
        "trainer_step_s": statistics.median(times[names[1]]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "baseline_step_cpu_s": statistics.median(cpu_times[names[0]]),
        "trainer_step_cpu_s": statistics.median(cpu_times[names[1]]),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "threads": _threads(),
        "rounds": rounds,
        "steps_per_round": k,
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def measure(options: dict) -> dict:
    """Run in a fresh process (see ``run_benchmark``): measure one trainer."""
    import resource

    import torch

    from nnunet_ext.core.inference import predictor_for_trainer

    torch.manual_seed(options.get("seed", 0))
    _set_threads(options)
    device = torch.device(options["device"])
    trainer = _make_trainer(options, options["trainer"])
    cls = type(trainer)
    n_warmup, n_steps = options["warmup"], options["iterations"]
    batches = _fetch_batches(trainer, n_warmup + n_steps + 2)
    for batch in batches[:n_warmup]:
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device) / 2**20
    rss_before = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_time, step_cpu_time = _timed_steps(trainer, batches[n_warmup:-2], device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        memory = {
            "peak_memory_mb": peak,
            "memory_kind": "CUDA max_memory_allocated",
            "static_memory_mb": base_mem,
        }
    else:
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory = {
            "peak_memory_mb": max(peak_after, peak_before) - rss_before,
            "memory_kind": "CPU peak RSS growth during the timed steps",
        }
    if type(trainer.network).__name__ != "OptimizedModule":  # saved-tensor hooks and inductor don't mix
        memory.update(training_memory_estimate(trainer, batches[-2]))
        memory["train_step_gflop"] = train_step_flops(trainer, batches[-1]) / 1e9

    # sliding-window inference on validation cases, exactly nnU-Net's predictor
    predictor = predictor_for_trainer(trainer, tta=not options["no_mirroring"])  # deep supervision off, eval
    _, dataset_val = trainer.get_tr_and_val_datasets()
    keys = sorted(dataset_val.identifiers)[: options["cases"]]
    times = []
    for key in keys:
        data, _, _, _ = dataset_val.load_case(key)
        data = torch.from_numpy(data[:]).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        predictor.predict_sliding_window_return_logits(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "trainer": cls.__name__,
        "train_step_s": step_time,
        "train_step_cpu_s": step_cpu_time,
        "threads": _threads(),
        **memory,
        "inference_s_per_case": sum(times) / len(times) if times else None,
        "inference_cases": keys,
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "batch_size": trainer.batch_size,
        "patch_size": list(trainer.configuration_manager.patch_size),
        "device": str(device),
        "torch_compile": type(trainer.network).__name__ == "OptimizedModule",
    }


def run_benchmark(
    plans_file: Path,
    configuration: str,
    trainer: str,
    baseline: str = "nnUNetTrainer",
    device: str = "auto",
    iterations: int = 5,
    warmup: int = 2,
    cases: int = 2,
    fold: int = 0,
    no_mirroring: bool = False,
    rounds: int = 10,
    steps_per_round: int = 2,
    threads: int | None = None,
) -> dict:
    """Measure ``baseline`` and ``trainer`` in fresh processes, one after the other, then both interleaved in
    one process (``rounds`` x ``steps_per_round`` steps each; 0 rounds skips it); return all and ratios."""

    from nnunet_ext.core.nnunet_commands import ext_trainer_env, find_trainer
    from nnunet_ext.planning.plans import load_plans, validate

    validate(load_plans(plans_file), configuration, force=True)  # measure any plans nnU-Net accepts
    for name in (trainer, baseline):
        find_trainer(name)  # clear error before spending minutes
    device = str(torch_device(device))  # auto: cuda or cpu; a device this machine lacks is refused here
    results = {}
    with tempfile.TemporaryDirectory(prefix="nnunet_ext_bench_") as tmp:
        env = ext_trainer_env()
        env["nnUNet_results"] = tmp
        env["nnUNet_preprocessed"] = str(Path(plans_file).resolve().parent.parent)
        env.setdefault("nnUNet_raw", tmp)
        env["nnUNet_n_proc_DA"] = "0"
        common = {
            "plans_file": str(Path(plans_file).resolve()),
            "configuration": configuration,
            "device": device,
            "warmup": warmup,
            "fold": fold,
            "threads": threads,
        }

        def worker(label: str, options: dict) -> dict:
            out = Path(tmp) / f"{label}.json"
            from nnunet_ext.core.nnunet_commands import child_process

            # its own process group, SIGINT/SIGTERM forwarded and waited for: killing bench leaves no
            # measurement running
            with child_process(
                [sys.executable, "-m", "nnunet_ext.tools.bench", json.dumps(options), str(out)],
                env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
            ) as proc:
                output, _ = proc.communicate()
            if proc.returncode != 0 or not out.is_file():
                tail = "\n".join((output or "").strip().splitlines()[-15:])
                raise UserError(f"measuring {label} failed:\n{tail}")
            return json.loads(out.read_text())

        for name in (baseline, trainer):
            print(
                f"measuring {name} ({warmup} warm-up + {iterations} timed train steps, {cases} inference cases) ...",
                flush=True,
            )
            options = {**common, "trainer": name, "iterations": iterations, "cases": cases}
            results[name] = worker(name, {**options, "no_mirroring": no_mirroring})
        interleaved = None
        if rounds > 0:
            print(
                f"interleaving {baseline} and {trainer} in one process "
                f"({rounds} rounds x {steps_per_round} train steps each) ...",
                flush=True,
            )
            options = {**common, "mode": "interleaved", "baseline": baseline, "trainer": trainer}
            interleaved = worker(
                "interleaved", {**options, "rounds": rounds, "steps_per_round": steps_per_round}
            )
    b, t = results[baseline], results[trainer]
    ratios = {}
    keys = ("train_step_s", "train_step_gflop", "peak_memory_mb", "memory_estimate_mb")
    for key in (*keys, "inference_s_per_case", "parameters"):
        if key == "peak_memory_mb" and device == "cpu":
            continue  # RSS growth on CPU is allocator caching, no ratio worth printing (see the estimate)
        if b.get(key) and t.get(key) is not None:
            ratios[key] = t[key] / b[key]
    if b.get("train_step_cpu_s") and device == "cpu":
        ratios["train_step_cpu_s"] = t["train_step_cpu_s"] / b["train_step_cpu_s"]
    if interleaved:
        ratios["train_step_interleaved_s"] = interleaved["ratio_median"]
        if device == "cpu":
            ratios["train_step_interleaved_cpu_s"] = interleaved["cpu_ratio_median"]
    return {
        "configuration": configuration,
        "plans_file": str(plans_file),
        "device": device,
        "baseline": b,
        "trainer": t,
        "interleaved": interleaved,
        "ratios": ratios,
    }


def format_report(r: dict) -> str:
    b, t = r["baseline"], r["trainer"]
    inter = r.get("interleaved")
    if inter:  # the load-robust train-step measurement (see the module docstring)
        b = {
            **b,
            "train_step_interleaved_s": inter["baseline_step_s"],
            "train_step_interleaved_cpu_s": inter.get("baseline_step_cpu_s"),
        }
        t = {
            **t,
            "train_step_interleaved_s": inter["trainer_step_s"],
            "train_step_interleaved_cpu_s": inter.get("trainer_step_cpu_s"),
        }
    rows = [
        ("train step [s]", "train_step_s", "{:.3f}"),
        ("  interleaved [s]", "train_step_interleaved_s", "{:.3f}"),
        ("  CPU time [s]", "train_step_cpu_s", "{:.3f}"),
        ("  interl. CPU time [s]", "train_step_interleaved_cpu_s", "{:.3f}"),
        ("train step [GFLOP]", "train_step_gflop", "{:.1f}"),
        ("peak memory [MiB]", "peak_memory_mb", "{:.0f}"),
        ("memory estimate [MiB]", "memory_estimate_mb", "{:.0f}"),
        ("inference / case [s]", "inference_s_per_case", "{:.2f}"),
        ("parameters [M]", "parameters", "{:.3f}"),
    ]
    width = max(len(b["trainer"]), len(t["trainer"]), 12)
    lines = [
        f"configuration {r['configuration']} on {r['device']} ({t.get('threads')} threads), batch "
        f"{t['batch_size']}, patch {t['patch_size']}",
        f"{'':<22}{b['trainer']:>{width}}{t['trainer']:>{width + 2}}{'ratio':>10}",
    ]
    for label, key, fmt in rows:
        scale = 1e-6 if key == "parameters" else 1

        def cell(v, fmt=fmt, scale=scale):
            return fmt.format(v * scale) if v is not None else "n/a"

        if "cpu" in key and r["device"] != "cpu":
            continue  # host CPU time says nothing about GPU work
        ratio = f"{r['ratios'][key]:.2f}x" if key in r["ratios"] else "n/a"
        lines.append(f"{label:<22}{cell(b.get(key)):>{width}}{cell(t.get(key)):>{width + 2}}{ratio:>10}")
    lines.append(f"peak memory: {t['memory_kind']}")
    if "memory_estimate_mb" in t:
        lines.append(
            "memory estimate: parameters + gradients + optimizer state + tensors saved for backward "
            f"({b['state_memory_mb']:.0f} + {b['activation_memory_mb']:.0f} vs "
            f"{t['state_memory_mb']:.0f} + {t['activation_memory_mb']:.0f} MiB)"
        )
    if inter:
        lines.append(
            f"interleaved: median of {inter['rounds']} per-round ratios (range "
            f"{inter['ratio_min']:.2f}x-{inter['ratio_max']:.2f}x), {inter['steps_per_round']} steps per round"
        )
    return "\n".join(lines)


def _cmd_bench(args):
    from nnunet_ext.planning.plans import locate_plans

    plans_file = locate_plans(args.dataset, args.plans)
    r = run_benchmark(
        plans_file,
        args.configuration,
        args.trainer,
        args.baseline,
        args.device,
        args.iterations,
        args.warmup,
        args.cases,
        args.fold,
        args.no_mirroring,
        args.rounds,
        args.steps_per_round,
        args.threads,
    )
    print(format_report(r))
    if args.json:
        from nnunet_ext.core.io import atomic_write_json

        atomic_write_json(Path(args.json), r)
        print(f"wrote {args.json}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="train-step time, peak memory and inference time of a trainer vs plain nnUNetTrainer",
        description="Measure a trainer against a baseline on the same plans and configuration, in one run: "
        "train-step time, peak memory during training steps, sliding-window inference time per case. "
        "Prints the ratios trainer/baseline. Needs a preprocessed dataset (nnUNet_preprocessed).",
    )
    p.add_argument("dataset", help="dataset id, name, or path to a plans .json")
    p.add_argument("configuration", help="configuration, e.g. 3d_fullres or 3d_tiny")
    p.add_argument("-tr", "--trainer", required=True, help="trainer to measure, e.g. nnUNetTrainerBANet")
    p.add_argument("--baseline", default="nnUNetTrainer", help="baseline trainer (default nnUNetTrainer)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument(
        "-device", "--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)"
    )
    p.add_argument("--iterations", type=count_arg(1), default=5, help="timed train steps (default 5)")
    p.add_argument("--warmup", type=count_arg(0), default=2, help="untimed warm-up steps (default 2)")
    p.add_argument(
        "--cases", type=count_arg(1), default=2, help="validation cases for inference timing (default 2)"
    )
    p.add_argument("-f", "--fold", type=count_arg(0), default=0, help="fold whose split is used (default 0)")
    p.add_argument("--no-mirroring", action="store_true", help="time inference without test-time mirroring")
    p.add_argument(
        "--rounds",
        type=count_arg(0),
        default=10,
        help="rounds of the interleaved train-step timing, both trainers in one process (default 10; 0: skip)",
    )
    p.add_argument(
        "--steps-per-round",
        type=count_arg(1),
        default=2,
        help="train steps per trainer and round (default 2)",
    )
    p.add_argument(
        "--threads",
        type=count_arg(1),
        help="torch CPU threads in the workers (default: torch's). On a shared machine use 1 and read the CPU-time "
        "rows: process CPU time per step does not grow with other jobs' load the way wall time does",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_bench)


if __name__ == "__main__":  # worker: python -m nnunet_ext.tools.bench OPTIONS_JSON OUT_JSON
    worker_options = json.loads(sys.argv[1])
    if worker_options.get("mode") == "interleaved":
        result = measure_interleaved(worker_options)
    else:
        result = measure(worker_options)
    from nnunet_ext.core.io import atomic_write_json

    atomic_write_json(Path(sys.argv[2]), result)
