"""benchmarks/gpu_check.py (issue 19): argument parsing, the plan and the dry run.

The check itself compiles every trainer (minutes per trainer on a CPU): it is a benchmark, run by hand (see
docs/benchmarks.md, "GPU readiness check"). Its smallest real run (one eager trainer) still plans and
preprocesses a phantom first, about two minutes on 2 CPU cores, so it is not part of this fast test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.benchmark_scripts import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "gpu_check.py"
# nnUNetTrainer and every method trainer the project ships (issue 19's list)
SHIPPED = [
    "nnUNetTrainer",
    "nnUNetTrainerBANet",
    "nnUNetTrainerDoDNet",
    "nnUNetTrainerTransDoDNet",
    "nnUNetTrainerUniSeg",
    "nnUNetTrainerUniSegFT",
    "nnUNetTrainerLoRA",
    "nnUNetTrainerMedSeqFT",
    "nnUNetTrainerLabelPropA",
]


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_defaults_follow_the_device(gpu_check):
    cuda = gpu_check.parse_args(["--device", "cuda"])
    assert (cuda.size, cuda.rounds, cuda.steps_per_round, cuda.warmup) == ("real", 4, 2, 2)
    assert cuda.trainers == gpu_check.DEFAULT_TRAINERS
    assert cuda.out.endswith("gpu_check_cuda_real.json") and cuda.time_budget is None
    cpu = gpu_check.parse_args(["--device", "cpu", "--trainers", "nnUNetTrainer", "nnUNetTrainer"])
    assert (cpu.size, cpu.rounds, cpu.steps_per_round, cpu.trainers) == ("tiny", 3, 1, ["nnUNetTrainer"])
    args = gpu_check.parse_args(["--device", "cuda:1", "--size", "tiny", "--time-budget", "90", "--eager"])
    assert (args.size, args.time_budget, args.eager) == ("tiny", 90.0, True)


def test_every_shipped_trainer_is_checked_by_default(gpu_check):
    import nnunet_ext.trainers as ours

    assert set(SHIPPED) <= set(gpu_check.DEFAULT_TRAINERS)
    assert {t.__name__ for t in ours.METHOD_TRAINERS} <= set(gpu_check.DEFAULT_TRAINERS)


def test_plan_gives_each_trainer_what_it_needs(gpu_check):
    plan = gpu_check.make_plan(gpu_check.parse_args(["--device", "cuda"]))
    specs = {s["trainer"]: s for s in plan["trainers"]}
    assert list(specs) == gpu_check.DEFAULT_TRAINERS
    for name in ("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet", "nnUNetTrainerUniSeg"):
        assert specs[name]["dataset"] == "partial"  # partially labelled tasks
    for name in ("nnUNetTrainerLoRA", "nnUNetTrainerMedSeqFT"):
        assert specs[name]["pretrained"] == "required"
    assert specs["nnUNetTrainerMedSeqFT"]["mds_buffer"] and specs["nnUNetTrainerMedSeqFT"]["expert"]
    assert specs["nnUNetTrainerLabelPropA"]["num_folds"] == gpu_check.FULL_DATASET_FOLDS
    assert specs["nnUNetTrainer"] == {
        "trainer": "nnUNetTrainer",
        "dataset": "full",
        "pretrained": None,
        "mds_buffer": False,
        "expert": False,
        "num_folds": None,
    }
    assert set(plan["phantoms"]) == {"full", "partial"} and plan["configuration"] == "3d_fullres"
    assert plan["foundation"] and "GradScaler" in plan["autocast"] and "nnUNet_compile=1" in plan["compile"]
    cpu = gpu_check.make_plan(gpu_check.parse_args(["--device", "cpu", "--trainers", "nnUNetTrainerBANet"]))
    assert set(cpu["phantoms"]) == {"full"} and not cpu["foundation"] and cpu["configuration"] == "3d_tiny"
    assert "bf16" in cpu["autocast"] and "forced" in cpu["compile"]


def test_dry_run_prints_the_plan_and_writes_nothing(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cuda", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in SHIPPED:
        assert f"  {name}:" in printed
    assert "3d_fullres" in printed and "nothing prepared, nothing written" in printed
    assert not out.exists()


def test_bad_input_is_one_line_exit_1(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--trainers", "nnUNetTrainerNope", "--out", str(out)]) == 1
    assert gpu_check.main(["--dry-run", "--time-budget", "0", "--out", str(out)]) == 1
    assert gpu_check.main(["--dry-run", "--device", "mps", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "nnUNetTrainerNope" in err[0] and "--time-budget" in err[1] and "cuda, cuda:N or cpu" in err[2]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--size", "huge"])
    assert exit_info.value.code == 1
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused_before_anything_is_prepared(gpu_check, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: this would start the real check")
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cuda", "--trainers", "nnUNetTrainer", "--out", str(out)]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_script_runs_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--trainers", "nnUNetTrainerLoRA"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nnUNetTrainerLoRA: full phantom, -pretrained_weights foundation (required)" in proc.stdout


def test_a_failed_baseline_is_recorded_once(gpu_check, monkeypatch):
    import types

    calls = []

    def boom(run, kind):
        calls.append(kind)
        run.report["baselines"][kind] = {"status": "building"}
        raise ValueError("no compiler")

    monkeypatch.setattr(gpu_check, "_build_baseline", boom)
    run = types.SimpleNamespace(baselines={}, report={"baselines": {}})
    with pytest.raises(ValueError):
        gpu_check.baseline(run, "full")
    with pytest.raises(RuntimeError, match="baseline failed earlier: ValueError: no compiler"):
        gpu_check.baseline(run, "full")  # the next trainer of that phantom: not built again
    assert calls == ["full"] and run.report["baselines"]["full"]["status"] == "error"


def test_targets_are_judged_against_the_issue(gpu_check):
    res = {"timing": {"ratio": 1.7}, "flops": {"ratio": 1.65}, "memory": {"ratio": 1.5}}
    banet = gpu_check.target_check("nnUNetTrainerBANet", res)
    assert banet["step_ratio"]["limit"] == pytest.approx(1.05 * 1.65) and banet["step_ratio"]["met"]
    assert banet["memory_ratio"] == {"value": 1.5, "limit": 1.6, "met": True}
    dodnet = gpu_check.target_check("nnUNetTrainerDoDNet", {**res, "memory": {"ratio": None}})
    assert dodnet == {"step_ratio": {"value": 1.7, "limit": 1.15, "met": False}}
    assert gpu_check.target_check("nnUNetTrainerLoRA", res) is None


def test_all_task_inference_is_timed_against_one_task(gpu_check):
    """Multi-task trainers: one forward over every task (nnunet-ext predict's pass) vs one task's, judged
    against the issue's 1.2x."""
    import contextlib
    from types import SimpleNamespace

    import torch
    from torch import nn

    class ThreeTasks(nn.Module):
        num_tasks = 3

        def __init__(self):
            super().__init__()
            self.calls = []

        def task_scores(self, x, tasks=None):
            self.calls.append(None if tasks is None else list(tasks))
            return x.repeat(1, self.num_tasks if tasks is None else len(tasks), 1, 1, 1)

    net = ThreeTasks()
    trainer = SimpleNamespace(
        configuration_manager=SimpleNamespace(patch_size=[4, 8, 8]),
        num_input_channels=1,
        base_network=lambda: net,
    )
    run = SimpleNamespace(device=torch.device("cpu"), sync=lambda: None, autocast=contextlib.nullcontext)
    out = gpu_check.task_inference(run, trainer, rounds=3)
    assert out["tasks"] == 3 and out["limit"] == 1.2 and out["met"] == (out["ratio"] <= 1.2)
    assert out["ratio_range"][0] <= out["ratio"] <= out["ratio_range"][1]
    assert net.calls.count(None) == 4 and net.calls.count([0]) == 4  # warm-up + 3 rounds each
    res = {
        "timing": {"ratio": 1.0},
        "flops": {"ratio": 1.0},
        "memory": {"ratio": None},
        "task_inference": out,
    }
    targets = gpu_check.all_targets("nnUNetTrainerDoDNet", res)
    assert targets["all_task_inference_ratio"] == {"value": out["ratio"], "limit": 1.2, "met": out["met"]}
    assert set(gpu_check.MULTITASK_INFERENCE) == {
        "nnUNetTrainerDoDNet",
        "nnUNetTrainerTransDoDNet",
        "nnUNetTrainerUniSeg",
    }
