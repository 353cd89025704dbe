"""GPU readiness check (issue 19): every shipped trainer end to end on one device, in one short run.

    python benchmarks/gpu_check.py --device cuda --dry-run                 # the plan, nothing prepared
    timeout 590 python benchmarks/gpu_check.py --device cuda --time-budget 540 \\
        --out benchmarks/results/gpu_check_cuda_real.json                 # on a GPU (real size)
    nice -n 10 python benchmarks/gpu_check.py --device cpu --size tiny \\
        --out benchmarks/results/gpu_check_cpu_tiny.json                  # the CPU stand-in

It prepares its own phantoms (nnunet_ext.tools.phantoms, planned and preprocessed with the stock
``nnUNetv2_plan_and_preprocess``) in a workspace whose nnUNet_raw / nnUNet_preprocessed / nnUNet_results it
points nnU-Net to (a temporary folder, or ``--workdir`` to keep and reuse it). ``--size real`` uses nnU-Net's
own 3d_fullres plans of 80 x 160 x 160 phantoms (patch 80 x 160 x 160, 6 stages, 32-320 features, batch 2);
``--size tiny`` the 3d_tiny configuration of 24 x 48 x 48 phantoms (minutes on a CPU). Then, per trainer (each in its own
try/except: one failure is recorded with its traceback and the others go on):

1. **build** it as ``nnUNetv2_train`` does (``get_trainer_from_args``, ``maybe_load_checkpoint`` with
   ``-pretrained_weights`` where the method fine-tunes, ``on_train_start``, ``on_epoch_start``,
   ``on_train_epoch_start``), with AMP and ``torch.compile`` as nnU-Net decides (``nnUNet_compile=1``). On
   CUDA that is fp16 autocast with a GradScaler and inductor. nnU-Net never compiles or autocasts on a CPU,
   so the CPU stand-in forces both: ``_do_i_compile`` returns True (the real inductor backend, gcc) and every
   train step runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
2. **compiled vs eager**: an eager twin (same weights) and the compiled trainer take one train step on the
   same batch; the losses must agree to ``LOSS_TOLERANCE`` of the autocast dtype (the compiled step is also
   the first warm-up step, so its time is the compile time);
3. **train**: warm-up, then timed train steps alternating with a compiled ``nnUNetTrainer`` on the same plans
   in this process (rounds ABBA, ``--steps-per-round`` steps each; ms per step and ratio: medians of the
   rounds); every loss finite, the trainable weights changed; the FLOPs of one eager step
   (``nnunet_ext.tools.bench.train_step_flops``); peak memory ``torch.cuda.max_memory_allocated`` during the
   trainer's own rounds minus what was allocated before it was built (on a CPU the process max RSS, no ratio);
4. **round trip**: ``save_checkpoint``, a fresh trainer ``load_checkpoint``s it (``nnUNetv2_train --c``) and
   saves it again: both checkpoints' tensors identical; one test case predicted with the stock
   ``nnUNetPredictor.predict_single_npy_array`` three ways: the trained network in memory
   (``manual_initialization``, as nnU-Net's final validation), the fresh trainer's network, and
   ``initialize_from_trained_model_folder`` (what ``nnUNetv2_predict`` runs; eager, nnU-Net's default when
   nnUNet_compile is unset): bitwise identical segmentations and probabilities, or within
   ``PREDICTION_TOLERANCE`` where bitwise equality is not expected (merged LoRA weights, CUDA).

The JSON (``--out``) is rewritten after every phase, so a run cut off by ``--time-budget`` (or killed) still
holds everything that finished; ``--time-budget`` also stops the run itself (SIGALRM) and records where.
Fine-tuning trainers (LoRA, MedSeqFT, UniSegFT) start from a "foundation": a plain nnUNetTrainer checkpoint
of the same plans after one step; MedSeqFT's MDS buffer is selected from it (``select_buffer``) and its
full fine-tuning expert M_t^FFT is that checkpoint too (placed where the trainer looks for it, not trained).
See docs/benchmarks.md, section "GPU readiness check".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import itertools
import math
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: nnunet_ext is installed, this keeps it simple
    sys.path.insert(0, str(REPO))

from nnunet_ext.core.errors import UserError  # noqa: E402
from nnunet_ext.core.nnunet_commands import count_arg, device_arg  # noqa: E402

# nnUNetTrainer (the baseline itself: its ratio calibrates the method to ~1.0) and every shipped method
# trainer, in the order the run does them (what the targets are about first; the nnU-Net-network trainers
# whose compiled graph is already cached last).
DEFAULT_TRAINERS = [
    "nnUNetTrainer",
    "nnUNetTrainerBANet",
    "nnUNetTrainerDoDNet",
    "nnUNetTrainerUniSeg",
    "nnUNetTrainerTransDoDNet",
    "nnUNetTrainerLoRA",
    "nnUNetTrainerMedSeqFT",
    "nnUNetTrainerUniSegFT",
    "nnUNetTrainerLabelPropA",
]
SIZES = {
    "tiny": {"shape": (24, 48, 48), "configuration": "3d_tiny", "num_train": 6, "num_test": 1},
    "real": {"shape": (80, 160, 160), "configuration": "3d_fullres", "num_train": 6, "num_test": 1},
}
DATASET_IDS = {"full": 990, "partial": 991}
FULL_DATASET_FOLDS = 4  # the full phantom gets a 4-fold split: LabelPropA's (KFoldSplit) and everyone's
FOLD = 0
# compiled vs eager, loss of the same batch: |compiled - eager| <= atol + rtol * |eager|, per autocast dtype
LOSS_TOLERANCE = {"float32": (1e-3, 1e-4), "float16": (2e-2, 2e-3), "bfloat16": (5e-2, 5e-3)}
# before vs after the round trip where bitwise equality is not expected (checkpoints with merged LoRA weights:
# nnU-Net's predictor accumulates logits in float16, so merged vs unmerged weights can land one float16 step
# apart; and any comparison on CUDA): probabilities and the fraction of voxels whose label differs
PREDICTION_TOLERANCE = {"probability": 1e-2, "voxel_fraction": 1e-3}
TARGETS = {  # issue 19, measured on a GPU; step/memory ratios to nnUNetTrainer on the same plans
    "nnUNetTrainerBANet": {"step_vs_flop_ratio": 1.05, "memory": 1.6},
    "nnUNetTrainerDoDNet": {"step": 1.15},
    "nnUNetTrainerUniSeg": {"step": 1.1},
}
# multi-task networks: one forward over every task against one task's forward (nnunet-ext predict computes all
# tasks in one pass); issue 19's target for the all-task inference cost
MULTITASK_INFERENCE = {"nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet", "nnUNetTrainerUniSeg"}
ALL_TASK_INFERENCE_TARGET = 1.2


class Cutoff(BaseException):
    """The --time-budget ran out (raised by SIGALRM wherever the run is)."""


def parse_args(argv=None) -> argparse.Namespace:
    from nnunet_ext.cli import Parser  # bad arguments: one line, exit 1

    p = Parser(
        prog="gpu_check.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", type=device_arg, default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument(
        "--trainers",
        nargs="+",
        metavar="NAME",
        help=f"trainers to check (default: {' '.join(DEFAULT_TRAINERS)})",
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        help="real: nnU-Net's 3d_fullres plans of 80x160x160 phantoms (default on cuda); tiny: the 3d_tiny "
        "configuration of 24x48x48 phantoms (default on cpu)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds (the JSON keeps what finished); default: no limit",
    )
    p.add_argument("--out", help="JSON file (default benchmarks/results/gpu_check_<device>_<size>.json)")
    p.add_argument(
        "--workdir", help="keep the phantom workspace here and reuse it (default: a temporary folder)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan; prepare and write nothing")
    p.add_argument(
        "--eager", action="store_true", help="no torch.compile (skips the compiled-vs-eager check)"
    )
    p.add_argument(
        "--cpu-autocast",
        choices=("bf16", "off"),
        default="bf16",
        help="CPU only: train steps under bf16 autocast (default) or in fp32",
    )
    p.add_argument("--warmup", type=count_arg(1), help="warm-up steps incl. the compile step (default 2)")
    p.add_argument("--rounds", type=count_arg(1), help="timed rounds per trainer (default cuda 4, cpu 3)")
    p.add_argument(
        "--steps-per-round", type=count_arg(1), help="train steps per round (default cuda 2, cpu 1)"
    )
    p.add_argument("--threads", type=count_arg(1), help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if not cuda and args.device != "cpu":
        raise UserError(f"--device {args.device}: this check runs on cuda, cuda:N or cpu (the stand-in)")
    args.size = args.size or ("real" if cuda else "tiny")
    args.warmup = args.warmup or 2
    args.rounds = args.rounds or (4 if cuda else 3)
    args.steps_per_round = args.steps_per_round or (2 if cuda else 1)
    args.trainers = list(dict.fromkeys(args.trainers or DEFAULT_TRAINERS))
    if args.out is None:
        args.out = str(
            REPO / "benchmarks" / "results" / f"gpu_check_{args.device.split(':')[0]}_{args.size}.json"
        )
    if args.time_budget is not None and not args.time_budget > 0:
        raise UserError(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    return args


# ------------------------------------------------------------------------------------------------ the plan
def trainer_spec(name: str) -> dict:
    """What a trainer needs: which phantom, pretrained weights, MedSeqFT's buffer and expert, its folds."""
    from nnunet_ext.core.nnunet_commands import find_trainer
    from nnunet_ext.trainers import nnUNetTrainerDoDNet, nnUNetTrainerUniSeg, nnUNetTrainerUniSegFT

    cls = find_trainer(name)
    pretrained = None
    if getattr(cls, "needs_pretrained_weights", False):
        pretrained = "required"
    elif issubclass(cls, nnUNetTrainerUniSegFT):
        pretrained = "used"  # nnU-Net-network fine-tuning: -pretrained_weights as documented
    buffer = bool(getattr(cls, "needs_mds_buffer", False))
    return {
        "trainer": name,
        "dataset": "partial" if issubclass(cls, (nnUNetTrainerDoDNet, nnUNetTrainerUniSeg)) else "full",
        "pretrained": pretrained,
        "mds_buffer": buffer,
        "expert": buffer and getattr(cls, "expert", None) is not None,
        "num_folds": getattr(cls, "num_folds", None),
    }


def make_plan(args) -> dict:
    cuda = args.device.startswith("cuda")
    specs = [trainer_spec(n) for n in args.trainers]
    size = SIZES[args.size]
    compile_how = "off (--eager)"
    if not args.eager:
        compile_how = (
            "as nnU-Net decides with nnUNet_compile=1 (inductor)"
            if cuda
            else "forced on (nnU-Net never compiles on CPU): inductor CPU backend"
        )
    if cuda:
        amp = "fp16 autocast + GradScaler, as nnU-Net does on CUDA"
    else:
        amp = (
            "bf16 autocast around every train step (forced)" if args.cpu_autocast == "bf16" else "off (fp32)"
        )
    kinds = sorted({s["dataset"] for s in specs})
    return {
        "device": args.device,
        "size": args.size,
        "configuration": size["configuration"],
        "phantoms": {
            k: {
                "dataset_id": DATASET_IDS[k],
                "kind": k,
                "shape": list(size["shape"]),
                "num_train": size["num_train"],
                "num_test": size["num_test"],
                "folds": FULL_DATASET_FOLDS if k == "full" else 5,
            }
            for k in kinds
        },
        "baselines": [f"nnUNetTrainer on the {k} phantom (compiled like the trainers)" for k in kinds],
        "foundation": any(s["pretrained"] for s in specs),
        "compile": compile_how,
        "autocast": amp,
        "steps": {
            "warmup": args.warmup,
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "timed_per_trainer": args.rounds * args.steps_per_round,
        },
        "loss_tolerance": LOSS_TOLERANCE,
        "prediction_tolerance": PREDICTION_TOLERANCE,
        "time_budget_s": args.time_budget,
        "out": args.out,
        "trainers": specs,
    }


def print_plan(plan: dict) -> None:
    print(f"device {plan['device']}, size {plan['size']} (configuration {plan['configuration']})")
    for k, ph in plan["phantoms"].items():
        print(
            f"phantom {k}: Dataset{ph['dataset_id']}, {ph['num_train']}+{ph['num_test']} cases of "
            f"{' x '.join(map(str, ph['shape']))}, {ph['folds']}-fold split"
        )
    print(f"baselines: {'; '.join(plan['baselines'])}")
    print(f"torch.compile: {plan['compile']}; autocast: {plan['autocast']}")
    s = plan["steps"]
    print(
        f"steps per trainer: {s['warmup']} warm-up (incl. the compiled-vs-eager step), {s['rounds']} rounds x "
        f"{s['steps_per_round']} timed, alternating with the baseline; 1 eager FLOP-count step"
    )
    budget = plan["time_budget_s"]
    print(f"time budget: {f'{budget:g} s' if budget else 'none'}; JSON: {plan['out']}")
    print("trainers (phases: build, compiled-vs-eager, train, round trip):")
    for t in plan["trainers"]:
        extra = [f"{t['dataset']} phantom"]
        if t["pretrained"]:
            extra.append(f"-pretrained_weights foundation ({t['pretrained']})")
        if t["mds_buffer"]:
            extra.append("MDS buffer from the foundation")
        if t["expert"]:
            extra.append("expert M_t^FFT = foundation checkpoint")
        if t["num_folds"]:
            extra.append(f"{t['num_folds']}-fold split")
        print(f"  {t['trainer']}: {', '.join(extra)}")


# --------------------------------------------------------------------------------------------- utilities
class Run:
    """The state of one check run: arguments, device, workspace, baselines and the report (the JSON)."""

    def __init__(self, args, plan: dict, root: Path):
        import torch

        self.args, self.plan, self.root = args, plan, root
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.compile = not args.eager
        self.datasets: dict[str, str] = {}
        self.baselines: dict[str, dict] = {}
        self.foundation: str | None = None
        self.log = open(root / "nnunet_output.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in main)
        self.report = {
            "script": "benchmarks/gpu_check.py",
            "started": _now(),
            "finished": None,
            "complete": False,
            "args": {k: v for k, v in vars(args).items()},
            "machine": machine(self.device),
            "plan": plan,
            "workspace": {"root": str(root), "datasets": {}},
            "baselines": {},
            "trainers": {t: {"status": "not started"} for t in args.trainers},
        }

    def save(self) -> None:
        from nnunet_ext.core.io import atomic_write_json

        atomic_write_json(Path(self.args.out), self.report)

    def say(self, text: str) -> None:
        print(text, file=sys.__stdout__, flush=True)

    @contextlib.contextmanager
    def quiet(self):
        """nnU-Net's console output (plans, logs) goes to <workspace>/nnunet_output.log."""
        with contextlib.redirect_stdout(self.log):
            yield
        self.log.flush()

    def autocast(self):
        import torch

        if not self.cuda and self.args.cpu_autocast == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # CUDA: nnU-Net's own autocast inside train_step

    @property
    def amp_dtype(self) -> str:
        if self.cuda:
            return "float16"
        return "bfloat16" if self.args.cpu_autocast == "bf16" else "float32"

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def allocated_mb(self) -> float | None:
        import torch

        if not self.cuda:
            return None
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(self.device) / 2**20


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine(device) -> dict:
    import torch

    try:
        from importlib.metadata import version

        nnunet_version = version("nnunetv2")
    except Exception:  # noqa: BLE001
        nnunet_version = None
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nnunetv2": nnunet_version,
        "torch_threads": torch.get_num_threads(),
        "cxx_compiler": shutil.which("g++") or shutil.which("c++"),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    return info


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def environ(**values):
    """Set (str) or unset (None) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def eager_module(trainer):
    """The plain network a trainer trains (inside torch.compile / DDP and MedSeqFT's FeatureTap)."""
    from nnunet_ext.core import train_step

    return trainer.base_network() if hasattr(trainer, "base_network") else train_step.unwrap(trainer.network)


def is_compiled(trainer) -> bool:
    return type(trainer.network).__name__ == "OptimizedModule"


def record_losses(trainer, losses: list) -> None:
    """Wrap the trainer's train_step so that every loss it returns is kept (negligible overhead)."""
    step = trainer.train_step

    def recording(batch):
        out = step(batch)
        losses.append(float(out["loss"]))
        return out

    trainer.train_step = recording


def replay_buffer(trainer, n: int) -> None:
    """MedSeqFT draws one buffer batch per train step: prefetch ``n`` and cycle them (no loading while timed)."""
    loader = getattr(trainer, "dataloader_buffer", None)
    if loader is not None:
        trainer.dataloader_buffer = itertools.cycle([next(loader) for _ in range(n)])


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": dict(counters["graph_break"]),
    }


def tensor_differences(a, b, path: str = "") -> list[str]:
    """Where two nested checkpoint structures differ (tensors bitwise, on CPU)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [path]
        a, b = a.detach().cpu(), b.detach().cpu()
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys"]
        return [d for k in a for d in tensor_differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensor_differences(x, y, f"{path}[{i}]")]
    return []


# ------------------------------------------------------------------------------------------ preparation
def prepare_datasets(run: Run) -> None:
    """Phantoms of the kinds the trainers need, planned + preprocessed with the stock CLI (reused if present)."""
    from nnunet_ext.core.io import atomic_write_json
    from nnunet_ext.core.splits import kfold_split
    from nnunet_ext.planning.plans import load_plans, save_plans, tiny_configuration
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    size = SIZES[run.args.size]
    raw, pre = run.root / "nnUNet_raw", run.root / "nnUNet_preprocessed"
    for kind, spec in run.plan["phantoms"].items():
        did = spec["dataset_id"]
        start = time.monotonic()
        plans_file = next(iter(pre.glob(f"Dataset{did}_*/nnUNetPlans.json")), None)
        reused = plans_file is not None
        if plans_file is None:
            run.say(
                f"preparing the {kind} phantom (Dataset{did}, {size['num_train']}+{size['num_test']} cases) ..."
            )
            for old in raw.glob(f"Dataset{did}_*"):
                shutil.rmtree(old)
            write_phantom_dataset(
                raw,
                did,
                kind=kind,
                num_train=size["num_train"],
                num_test=size["num_test"],
                shape=size["shape"],
                seed=did,
            )
            exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
            env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}  # planning needs it unset
            proc = subprocess.run(
                [str(exe), "-d", str(did), "-c", "3d_fullres", "-np", str(min(8, os.cpu_count() or 1))],
                env=env,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
            )
            run.log.write(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
                raise RuntimeError(f"nnUNetv2_plan_and_preprocess -d {did} failed:\n{tail}")
            plans_file = next(pre.glob(f"Dataset{did}_*/nnUNetPlans.json"))
        plans = load_plans(plans_file)
        if size["configuration"] == "3d_tiny" and "3d_tiny" not in plans["configurations"]:
            tiny_configuration(plans)
            save_plans(plans_file, plans)
        folder = plans_file.parent
        if kind == "full" and not (folder / "splits_final.json").is_file():
            ids = sorted(
                p.name[: -len("_0000.nii.gz")] for p in (raw / folder.name / "imagesTr").glob("*_0000.nii.gz")
            )
            atomic_write_json(folder / "splits_final.json", kfold_split(ids, FULL_DATASET_FOLDS))
        run.datasets[kind] = folder.name
        cfg = plans["configurations"][size["configuration"]]
        kw = cfg["architecture"]["arch_kwargs"]
        run.report["workspace"]["datasets"][kind] = {
            "name": folder.name,
            "configuration": size["configuration"],
            "patch_size": cfg.get("patch_size"),
            "batch_size": cfg.get("batch_size"),
            "n_stages": kw.get("n_stages"),
            "features_per_stage": kw.get("features_per_stage"),
            "reused": reused,
            "seconds": round(time.monotonic() - start, 1),
        }
        run.save()


def _trainer_from_args(run: Run, name: str, kind: str, compile: bool):
    """nnU-Net's ``get_trainer_from_args`` for ``name`` on ``kind``'s phantom; on a CPU, compile forced on."""
    from nnunetv2.run.run_training import get_trainer_from_args

    configuration = SIZES[run.args.size]["configuration"]
    trainer = get_trainer_from_args(
        run.datasets[kind], configuration, FOLD, name, "nnUNetPlans", False, run.device
    )
    if compile and not run.cuda:
        trainer._do_i_compile = lambda: True
    return trainer


def build_trainer(run: Run, name: str, kind: str, *, compile: bool, results: Path, pretrained: str | None):
    """A trainer as ``nnUNetv2_train DATASET CONFIGURATION 0 -tr NAME [-pretrained_weights P]`` builds it, up
    to the first training epoch's start. ``compile``: nnU-Net decides with nnUNet_compile=1 (CUDA) / forced on
    (CPU, where nnU-Net never compiles); False: eager."""
    import torch
    from nnunetv2.run.run_training import maybe_load_checkpoint

    flag = "1" if compile else "f"
    with environ(nnUNet_results=str(results), nnUNet_compile=flag), run.quiet():
        trainer = _trainer_from_args(run, name, kind, compile)
        if getattr(trainer, "expert", None) is not None and hasattr(trainer, "expert_checkpoint"):
            path = trainer.expert_checkpoint()  # MedSeqFT's M_t^FFT: the foundation, not trained here
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run.foundation, path)
        maybe_load_checkpoint(trainer, False, False, pretrained)
        trainer.on_train_start()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
    if compile and run.cuda and not is_compiled(trainer):
        trainer.print_to_log_file("gpu_check: nnU-Net decided not to compile")
    torch.cuda.empty_cache() if run.cuda else None
    return trainer


def prepare_foundation(run: Run) -> None:
    """A plain nnUNetTrainer checkpoint of the full phantom's plans after one eager fp32 step (the
    -pretrained_weights of LoRA / MedSeqFT / UniSegFT), and MedSeqFT's MDS buffer selected with it."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    results = run.root / "results_foundation"
    path = results / "foundation_checkpoint.pth"
    if not path.is_file():
        seed_everything(12345)
        with environ(nnUNet_results=str(results), nnUNet_compile="f"), run.quiet():
            t = get_trainer_from_args(
                run.datasets["full"], SIZES[run.args.size]["configuration"], FOLD, "nnUNetTrainer", "nnUNetPlans",
                False, run.device,
            )  # fmt: skip
            t.initialize()
            dl, _ = t.get_dataloaders()
            t.train_step(next(dl))
            t.save_checkpoint(str(path))
        del t
    run.foundation = str(path)
    if any(s["mds_buffer"] for s in run.plan["trainers"]):
        from nnunet_ext.medseqft.method import buffer_path, select_buffer, write_buffer

        cfg = SIZES[run.args.size]["configuration"]
        with run.quiet():
            record = select_buffer(
                path,
                run.datasets["full"],
                cfg,
                k=2,
                views=1,
                progress=False,
                fold=FOLD,
                device=run.args.device,
            )
            write_buffer(record, buffer_path(run.datasets["full"], "nnUNetPlans", cfg), overwrite=True)
    if run.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ phases
def timed(run: Run, trainer, batches) -> tuple[float, float]:
    from nnunet_ext.tools.bench import _timed_steps

    with run.autocast():
        return _timed_steps(trainer, batches, run.device)


def flop_step(run: Run, trainer, batch, res: dict) -> float | None:
    """FLOPs of one EAGER train step of ``trainer`` (its compiled network swapped for the plain module for the
    step), and the dtype autocast gave the first convolution (``autocast_dtype_seen``)."""
    from torch import nn

    from nnunet_ext.tools.bench import train_step_flops

    module = trainer.network
    plain = module._orig_mod if is_compiled(trainer) else module
    conv = next((m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    seen = []
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype))) if conv is not None else None
    trainer.network = plain
    try:
        with run.autocast():
            flops = train_step_flops(trainer, batch)
    finally:
        trainer.network = module
        if hook is not None:
            hook.remove()
    res["autocast_dtype_seen"] = seen[0].replace("torch.", "") if seen else None
    return flops


def baseline(run: Run, kind: str) -> dict:
    """The compiled nnUNetTrainer of ``kind``'s plans the trainers are timed against (built once; a failure is
    recorded once and every trainer that needs it fails with that message)."""
    if kind in run.baselines:
        return run.baselines[kind]
    info = run.report["baselines"].get(kind, {})
    if "error" in info:
        raise RuntimeError(f"the {kind} phantom's baseline failed earlier: {info['error']}")
    try:
        return _build_baseline(run, kind)
    except Exception as e:
        info = run.report["baselines"][kind]
        info.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise


def _build_baseline(run: Run, kind: str) -> dict:
    import torch

    run.say(f"baseline: nnUNetTrainer on the {kind} phantom ...")
    info: dict = {"status": "building"}
    run.report["baselines"][kind] = info
    before = run.allocated_mb()
    seed_everything(run.args.seed)
    start = time.monotonic()
    trainer = build_trainer(
        run,
        "nnUNetTrainer",
        kind,
        compile=run.compile,
        results=run.root / "results_baseline",
        pretrained=None,
    )
    losses: list[float] = []
    record_losses(trainer, losses)
    k = run.args.steps_per_round
    batches = [next(trainer.dataloader_train) for _ in range(run.args.warmup + k)]
    info["build_s"] = round(time.monotonic() - start, 2)
    first = time.monotonic()
    for b in batches[: run.args.warmup]:
        with run.autocast():
            trainer.train_step(b)
    info["warmup_s"] = round(time.monotonic() - first, 2)
    if run.cuda:
        run.sync()
        torch.cuda.reset_peak_memory_stats(run.device)
    wall, _ = timed(run, trainer, batches[run.args.warmup :])
    if run.cuda:
        info["peak_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20 - before
    info["gflop"] = flop_step(run, trainer, batches[-1], info) / 1e9
    info.update(
        compiled=is_compiled(trainer),
        ms_per_step_alone=wall * 1e3,
        losses_finite=all(math.isfinite(v) for v in losses),
        status="ready",
    )
    run.baselines[kind] = {"trainer": trainer, "batches": batches[run.args.warmup :], "info": info}
    run.save()
    return run.baselines[kind]


def check_trainer(run: Run, name: str, res: dict) -> None:
    """The four phases for one trainer; ``res`` (its JSON entry) is filled in as they finish."""
    import torch

    from nnunet_ext.core import train_step

    spec = next(s for s in run.plan["trainers"] if s["trainer"] == name)
    kind = spec["dataset"]
    res.update(dataset=run.datasets[kind], phases_done=[])
    pretrained = run.foundation if spec["pretrained"] else None
    res["phase"] = f"baseline ({kind} phantom)"
    base = baseline(run, kind)
    counters0 = dynamo_counters()

    # 1. build ------------------------------------------------------------------------------------------------
    res["phase"] = "build"
    before = run.allocated_mb()
    seed_everything(run.args.seed)
    start = time.monotonic()
    results = run.root / "results"
    trainer = build_trainer(run, name, kind, compile=run.compile, results=results, pretrained=pretrained)
    losses: list[float] = []
    record_losses(trainer, losses)
    net = eager_module(trainer)
    res.update(
        build_s=round(time.monotonic() - start, 2),
        compiled=is_compiled(trainer),
        compile_forced=run.compile and not run.cuda,
        autocast=run.amp_dtype,
        grad_scaler=trainer.grad_scaler is not None,
        patch_size=[int(p) for p in trainer.configuration_manager.patch_size],
        batch_size=int(trainer.batch_size),
        parameters=sum(p.numel() for p in net.parameters()),
        trainable_parameters=sum(p.numel() for p in net.parameters() if p.requires_grad),
    )
    start_weights = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    k, warmup = run.args.steps_per_round, run.args.warmup
    replay_buffer(trainer, warmup + k + 1)
    batches = [next(trainer.dataloader_train) for _ in range(warmup + k + 1)]
    res["phases_done"].append("build")
    run.save()

    # 2. compiled vs eager, same batch (the compiled step is the first warm-up step) ---------------------------
    res["phase"] = "compiled vs eager"
    if run.compile:
        seed_everything(run.args.seed)
        twin = build_trainer(
            run, name, kind, compile=False, results=run.root / "results_eager", pretrained=pretrained
        )
        train_step.unwrap(twin.network).load_state_dict(train_step.unwrap(trainer.network).state_dict())
        extra = getattr(trainer, "dataloader_buffer", None)
        if extra is not None:  # MedSeqFT: the same buffer batch for both
            buffer_batch = next(extra)
            twin.dataloader_buffer = itertools.repeat(buffer_batch)
        seed_everything(run.args.seed)
        t0 = time.monotonic()
        with run.autocast():
            eager_loss = float(twin.train_step(copy.deepcopy(batches[0]))["loss"])
        eager_s = time.monotonic() - t0
        del twin
        run.allocated_mb()  # frees the twin
        if extra is not None:
            trainer.dataloader_buffer = itertools.chain([buffer_batch], extra)
        seed_everything(run.args.seed)
        t0 = time.monotonic()
        with run.autocast():
            trainer.train_step(copy.deepcopy(batches[0]))
        run.sync()
        compiled_loss = losses[-1]
        rtol, atol = LOSS_TOLERANCE[run.amp_dtype]
        diff = abs(compiled_loss - eager_loss)
        res["compiled_vs_eager"] = {
            "loss_compiled": compiled_loss,
            "loss_eager": eager_loss,
            "abs_diff": diff,
            "tolerance": f"atol {atol:g} + rtol {rtol:g} x |eager| ({run.amp_dtype})",
            "ok": bool(math.isfinite(diff) and diff <= atol + rtol * abs(eager_loss)),
            "first_compiled_step_s": round(time.monotonic() - t0, 2),
            "eager_step_s": round(eager_s, 2),
        }
    else:
        res["compiled_vs_eager"] = None
        with run.autocast():
            trainer.train_step(batches[0])
    res["phases_done"].append("compiled vs eager")
    run.save()

    # 3. train: warm-up, timed rounds alternating with the baseline, FLOPs, memory ------------------------------
    res["phase"] = "train"
    for b in batches[1:warmup]:
        with run.autocast():
            trainer.train_step(b)
    timed_batches = batches[warmup : warmup + k]
    times: dict[str, list[float]] = {"baseline": [], "trainer": []}
    cpu_times: dict[str, list[float]] = {"baseline": [], "trainer": []}
    peak = 0.0
    sides = {"baseline": (base["trainer"], base["batches"]), "trainer": (trainer, timed_batches)}
    for r in range(run.args.rounds):
        for side in ("baseline", "trainer") if r % 2 == 0 else ("trainer", "baseline"):
            tr, bs = sides[side]
            if run.cuda:
                run.sync()
                torch.cuda.reset_peak_memory_stats(run.device)
            wall, cpu = timed(run, tr, bs)
            times[side].append(wall)
            cpu_times[side].append(cpu)
            if run.cuda and side == "trainer":
                peak = max(peak, torch.cuda.max_memory_allocated(run.device) / 2**20)
    ratios = [t / b for b, t in zip(times["baseline"], times["trainer"], strict=True)]
    gflop = flop_step(run, trainer, batches[-1], res) / 1e9
    base_info = base["info"]
    res["timing"] = {
        "ms_per_step": statistics.median(times["trainer"]) * 1e3,
        "baseline_ms_per_step": statistics.median(times["baseline"]) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": run.args.rounds,
        "steps_per_round": k,
    }
    if not run.cuda:
        res["timing"]["cpu_ms_per_step"] = statistics.median(cpu_times["trainer"]) * 1e3
        res["timing"]["cpu_ratio"] = statistics.median(
            [t / b for b, t in zip(cpu_times["baseline"], cpu_times["trainer"], strict=True)]
        )
    res["flops"] = {"gflop": gflop, "baseline_gflop": base_info["gflop"], "ratio": gflop / base_info["gflop"]}
    if run.cuda:
        own = peak - before
        res["memory"] = {
            "kind": "torch.cuda.max_memory_allocated during its rounds minus what was allocated before it was built",
            "peak_mb": own,
            "baseline_peak_mb": base_info["peak_memory_mb"],
            "ratio": own / base_info["peak_memory_mb"],
        }
    else:
        res["memory"] = {
            "kind": "process max RSS so far (whole process, every trainer before it too): no per-trainer ratio",
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ratio": None,
        }
    after = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    changed = sum(not torch.equal(start_weights[n], after[n]) for n in start_weights)
    res["losses"] = losses[:]
    res["all_losses_finite"] = all(math.isfinite(v) for v in losses)
    res["weights_changed"] = {"tensors_changed": changed, "trainable_tensors": len(start_weights)}
    if trainer.grad_scaler is not None:
        res["grad_scale"] = float(trainer.grad_scaler.get_scale())
    del start_weights, after
    res["phases_done"].append("train")
    run.save()

    # 4. round trip: checkpoint -> fresh trainer -> checkpoint; the stock predictor three ways -----------------
    res["phase"] = "round trip"
    with run.quiet():
        ckpt = Path(trainer.output_folder) / "checkpoint_final.pth"
        trainer.save_checkpoint(str(ckpt))
    fresh = build_fresh(run, name, kind, results)
    with run.quiet():
        again = Path(trainer.output_folder) / "checkpoint_roundtrip.pth"
        fresh.save_checkpoint(str(again))
    a = torch.load(ckpt, map_location="cpu", weights_only=False)
    b = torch.load(again, map_location="cpu", weights_only=False)
    keys = [
        key for key in ("network_weights", "lora_state", "optimizer_state", "grad_scaler_state") if key in a
    ]
    differs = [d for key in keys for d in tensor_differences(a.get(key), b.get(key), key)]
    res["checkpoint_round_trip"] = {"compared": keys, "identical": not differs, "differences": differs[:10]}
    del a, b
    res["prediction"] = predict_three_ways(run, trainer, fresh, Path(trainer.output_folder_base))
    res["phases_done"].append("round trip")
    run.save()
    if name in MULTITASK_INFERENCE:  # 5. all-task vs one-task inference (a target, not a check)
        res["phase"] = "task inference"
        res["task_inference"] = task_inference(run, trainer)
        res["phases_done"].append("task inference")
    counters1 = dynamo_counters()
    res["dynamo"] = {
        "graph_breaks": counters1["graph_breaks"] - counters0["graph_breaks"],
        "break_reasons": sorted(
            {
                r.splitlines()[0][:200]
                for r in set(counters1["break_reasons"]) - set(counters0["break_reasons"])
            }
        )[:10],
    }
    checks = {
        "compiled": res["compiled"] if run.compile else None,
        "finite": res["all_losses_finite"],
        "weights_changed": changed > 0,
        "compiled_equals_eager": res["compiled_vs_eager"]["ok"] if res["compiled_vs_eager"] else None,
        "checkpoint_round_trip": res["checkpoint_round_trip"]["identical"],
        "prediction_round_trip": res["prediction"]["ok"],
    }
    res["checks"] = checks
    res["targets"] = all_targets(name, res)
    res["phase"] = None
    res["status"] = "passed" if all(v is not False for v in checks.values()) else "failed"


def build_fresh(run: Run, name: str, kind: str, results: Path):
    """A fresh trainer (another random initialisation) that loads the checkpoint_final.pth just written, as
    ``nnUNetv2_train ... --c`` does (``maybe_load_checkpoint(trainer, True, ...)``)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    seed_everything(run.args.seed + 1)
    with environ(nnUNet_results=str(results), nnUNet_compile="1" if run.compile else "f"), run.quiet():
        fresh = _trainer_from_args(run, name, kind, run.compile)
        maybe_load_checkpoint(fresh, True, False, None)
    return fresh


def predict_three_ways(run: Run, trainer, fresh, model_folder: Path) -> dict:
    """One raw test case through the stock ``nnUNetPredictor.predict_single_npy_array``: with the trained
    network in memory (before), the fresh trainer's network, and the model folder's checkpoint (after)."""
    import numpy as np
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    image = sorted(
        (Path(os.environ["nnUNet_raw"]) / trainer.plans_manager.dataset_name / "imagesTs").glob("*")
    )[0]
    reader = trainer.plans_manager.image_reader_writer_class()
    img, props = reader.read_images([str(image)])

    def predictor():
        return nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=True,
            perform_everything_on_device=run.cuda,
            device=run.device,
            verbose=False,
            allow_tqdm=False,
        )

    outputs = {}
    with environ(nnUNet_compile=None), run.quiet():  # nnU-Net's default: the predictor does not compile
        for label, t in (("trained", trainer), ("fresh", fresh)):
            t.set_deep_supervision_enabled(False)
            net = eager_module(t)
            net.eval()
            p = predictor()
            p.manual_initialization(
                net,
                t.plans_manager,
                t.configuration_manager,
                [net.state_dict()],
                t.dataset_json,
                type(t).__name__,
                t.inference_allowed_mirroring_axes,
            )
            outputs[label] = p.predict_single_npy_array(img, props, None, None, True)
        p = predictor()
        p.initialize_from_trained_model_folder(str(model_folder), (FOLD,), "checkpoint_final.pth")
        outputs["model_folder"] = p.predict_single_npy_array(img, props, None, None, True)
    seg0, prob0 = outputs["trained"]
    # bitwise where the saved weights ARE the trained ones (on CPU); within the tolerance where the checkpoint
    # stores merged LoRA weights (the predictor keeps logits in float16: one float16 step apart) or on CUDA
    merged = trainer_stores_merged_weights(trainer)
    out = {"case": image.name, "criterion": {}}
    ok = True
    for label in ("fresh", "model_folder"):
        seg, prob = outputs[label]
        diff = float(np.max(np.abs(prob.astype(np.float64) - prob0.astype(np.float64))))
        bitwise = bool(np.array_equal(prob, prob0) and np.array_equal(seg, seg0))
        differing = int(np.sum(seg != seg0))
        exact = not run.cuda and not (merged and label == "model_folder")
        if exact:
            out["criterion"][label] = "bitwise identical segmentation and probabilities"
            good = bitwise
        else:
            tol, frac = PREDICTION_TOLERANCE["probability"], PREDICTION_TOLERANCE["voxel_fraction"]
            out["criterion"][label] = f"max |probability difference| <= {tol:g}, <= {frac:g} of voxels differ"
            good = diff <= tol and differing <= frac * seg0.size
        out[label] = {
            "bitwise_identical": bitwise,
            "max_abs_probability_diff": diff,
            "voxels_differing": differing,
            "ok": good,
        }
        ok = ok and good
    out["foreground_voxels"] = int(np.sum(seg0 > 0))
    out["ok"] = ok
    return out


def task_inference(run: Run, trainer, rounds: int = 5) -> dict:
    """Forward time of one patch for every task (``nnunet-ext predict``'s pass) against one task, the eager
    network in eval mode under the run's autocast, alternating rounds, median ratio."""
    import statistics

    import torch

    from nnunet_ext.multitask.predict import restrict_tasks

    net = eager_module(trainer)
    net.eval()
    patch = trainer.configuration_manager.patch_size
    channels = trainer.num_input_channels
    x = torch.randn(1, channels, *patch, device=run.device)
    modules = {"all": restrict_tasks(net, None), "one": restrict_tasks(net, [0])}
    seconds: dict[str, list[float]] = {"all": [], "one": []}
    with torch.no_grad(), run.autocast():
        for module in modules.values():  # warm-up
            module(x)
        for _ in range(rounds):
            for label, module in modules.items():
                run.sync()
                start = time.perf_counter()
                module(x)
                run.sync()
                seconds[label].append(time.perf_counter() - start)
    ratios = [a / o for a, o in zip(seconds["all"], seconds["one"])]
    ratio = statistics.median(ratios)
    return {
        "tasks": int(net.num_tasks),
        "ms_all_tasks": 1000 * statistics.median(seconds["all"]),
        "ms_one_task": 1000 * statistics.median(seconds["one"]),
        "ratio": ratio,
        "ratio_range": [min(ratios), max(ratios)],
        "limit": ALL_TASK_INFERENCE_TARGET,
        "met": ratio <= ALL_TASK_INFERENCE_TARGET,
    }


def trainer_stores_merged_weights(trainer) -> bool:
    """LoRA / MedSeqFT checkpoints hold W + BA merged (what the stock predictor loads), not the unmerged
    weights the trainer computes with."""
    return hasattr(trainer, "lora_injected")


def target_check(name: str, res: dict) -> dict | None:
    """The issue's GPU targets (judged only on a GPU; on a CPU listed for reference)."""
    target = TARGETS.get(name)
    if target is None:
        return None
    out = {}
    ratio = res["timing"]["ratio"]
    if "step" in target:
        out["step_ratio"] = {"value": ratio, "limit": target["step"], "met": ratio <= target["step"]}
    if "step_vs_flop_ratio" in target:
        limit = target["step_vs_flop_ratio"] * res["flops"]["ratio"]
        out["step_ratio"] = {"value": ratio, "limit": limit, "met": ratio <= limit}
    mem = res["memory"].get("ratio")
    if "memory" in target and mem is not None:
        out["memory_ratio"] = {"value": mem, "limit": target["memory"], "met": mem <= target["memory"]}
    return out


def all_targets(name: str, res: dict) -> dict | None:
    """:func:`target_check` plus the all-task inference target of the multi-task trainers."""
    out = target_check(name, res) or {}
    inference = res.get("task_inference")
    if inference:
        out["all_task_inference_ratio"] = {k: inference[k] for k in ("ratio", "limit", "met")}
        out["all_task_inference_ratio"]["value"] = out["all_task_inference_ratio"].pop("ratio")
    return out or None


# -------------------------------------------------------------------------------------------------- output
def summary_rows(report: dict) -> list[str]:
    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    rows = [
        "trainer | status | compiled | autocast | finite | compiled=eager | round trip | ms/step | ratio | peak MiB | mem ratio"
    ]
    for name, r in report["trainers"].items():
        if "checks" not in r:
            rows.append(
                f"{name} | {r['status']}{' (' + r['phase'] + ')' if r.get('phase') else ''} | | | | | | | | |"
            )
            continue
        c, t, m = r["checks"], r["timing"], r["memory"]
        rt = c["checkpoint_round_trip"] and c["prediction_round_trip"]
        rows.append(
            f"{name} | {r['status']} | {c['compiled']} | {r['autocast']} ({r.get('autocast_dtype_seen')}) | "
            f"{c['finite']} | {c['compiled_equals_eager']} | {rt} | {t['ms_per_step']:.1f} | {t['ratio']:.2f} | "
            f"{f(m.get('peak_mb', m.get('process_max_rss_mb')), '{:.0f}')} | {f(m['ratio'])}"
        )
    return rows


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        plan = make_plan(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print_plan(plan)
        print("dry run: nothing prepared, nothing written")
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: --device cuda but no CUDA GPU is available here; use --device cpu (the stand-in)",
            file=sys.stderr,
        )
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.suppress(AttributeError):  # many trainers share nnU-Net's forward code objects
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    with contextlib.suppress(AttributeError):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if args.device.startswith("cuda"):  # what nnUNetv2_train sets
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True

    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    keep = args.workdir is not None
    root = Path(args.workdir).resolve() if keep else Path(tempfile.mkdtemp(prefix="nnunet_ext_gpu_check_"))
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "results"):
        (root / sub).mkdir(exist_ok=True)
    env = {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_extTrainer": ext_trainer_env()["nnUNet_extTrainer"],
    }
    os.environ.update(env)
    run = Run(args, plan, root)
    t_start = time.monotonic()

    def cut(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise Cutoff

    if args.time_budget:
        signal.signal(signal.SIGALRM, cut)
        signal.setitimer(signal.ITIMER_REAL, args.time_budget)
    run.say(f"gpu_check on {args.device} ({args.size}); workspace {root}; JSON {args.out}")
    stopped = None
    try:
        try:
            run.report["phase"] = "preparing phantoms"
            prepare_datasets(run)
            os.environ["nnUNet_n_proc_DA"] = (
                "0"  # data augmentation in this process (batches fetched untimed)
            )
            if plan["foundation"]:
                run.report["phase"] = "preparing the foundation checkpoint"
                prepare_foundation(run)
            run.report["phase"] = "trainers"
            run.save()
        except Cutoff:
            stopped = f"time budget ran out during {run.report['phase']}"
        except Exception as e:  # noqa: BLE001 (the JSON says what failed)
            stopped = f"preparation failed: {type(e).__name__}: {e}"
            run.report["preparation_traceback"] = traceback.format_exc()
        for name in args.trainers if stopped is None else []:
            res = run.report["trainers"][name]
            res["status"] = "running"
            start = time.monotonic()
            run.say(f"{name} ...")
            try:
                check_trainer(run, name, res)
            except Cutoff:
                res["status"] = "cut off"
                stopped = f"time budget ran out in {name} ({res.get('phase')})"
            except Exception as e:  # noqa: BLE001 (one trainer's failure is recorded; the others go on)
                res["status"] = "error"
                res["error"] = f"{type(e).__name__}: {e}"
                res["traceback"] = traceback.format_exc()
            finally:
                res["seconds"] = round(time.monotonic() - start, 1)
                run.allocated_mb()
                run.save()
            run.say(
                f"{name}: {res['status']} in {res['seconds']:.0f} s"
                + (f" ({res['error']})" if "error" in res else "")
            )
            if "timing" in res:  # ms per step, peak memory and their ratios to nnUNetTrainer
                run.say("  " + summary_rows({"trainers": {name: res}})[1])
            if stopped:
                break
    except Cutoff:
        stopped = "time budget ran out"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        run.report.pop("phase", None)
        run.report["stopped"] = stopped
        run.report["finished"] = _now()
        run.report["seconds"] = round(time.monotonic() - t_start, 1)
        run.report["complete"] = stopped is None
        for info in run.report["baselines"].values():
            if info.get("status") != "ready":
                info["status"] = f"{info.get('status')}: stopped ({stopped})"
        run.report["summary"] = summary_rows(run.report)
        run.save()
        run.log.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(run.report["summary"]))
    if stopped:
        print(f"stopped: {stopped}")
    print(f"wrote {args.out}")
    failed = [n for n, r in run.report["trainers"].items() if r["status"] != "passed"]
    return 0 if not failed and not stopped else 2


if __name__ == "__main__":
    sys.exit(main())
