"""benchmarks/converge.py (issue 20): the plateau rule and the seed report, on synthetic runs (the trainings
themselves are a benchmark, docs/benchmarks.md)."""

from __future__ import annotations

import pytest
from support.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def converge():
    return load_benchmark("converge")


def test_plateau_needs_a_flat_last_fifth(converge):
    flat = [[min(1.0, e / 20), 0.5] for e in range(100)]  # structure a flat from epoch 20, b flat throughout
    rising = [[e / 100, 0.5 + 0.004 * e] for e in range(100)]  # still climbing at the end
    out = converge.plateau(flat, ["a", "b"])
    assert out["a"]["plateaued"] and out["b"]["plateaued"] and out["a"]["mean_last_20pct"] == 1.0
    out = converge.plateau(rising, ["a", "b"])
    assert not out["a"]["plateaued"] and not out["b"]["plateaued"]
    assert out["b"]["gain_vs_previous_20pct"] == pytest.approx(0.08)


def _run(dice: float, plateaued: bool = True) -> dict:
    structure = {"Dice": dice, "HD95": 10 * (1 - dice), "NSD": dice}
    return {
        "test": {"mean": {"liver": structure}},
        "training": {"epochs": 100, "plateau": {"liver": {"plateaued": plateaued}}},
        "train_cpu_s": 600.0,
    }


def test_report_gives_means_and_paired_differences_over_finished_seeds(converge, tmp_path):
    results = {
        (0, "nnUNetTrainer"): _run(0.80),
        (0, "nnUNetTrainerBANet"): _run(0.84),
        (1, "nnUNetTrainer"): _run(0.90),
        (1, "nnUNetTrainerBANet"): _run(0.92, plateaued=False),
        (2, "nnUNetTrainer"): _run(0.5),  # its BA-Net run has not finished: left out of every number
    }
    text = converge.report(tmp_path, "banet", [0, 1, 2], results)
    assert "seeds with every model finished: [0, 1] (of [0, 1, 2])" in text
    dice_row = next(line for line in text.splitlines() if line.startswith("| liver |"))
    assert dice_row == "| liver | 0.850 ± 0.050 | 0.880 ± 0.040 | +0.030 ± 0.010 |"
    assert "| seed 1 nnUNetTrainerBANet | 100 | 10 | not: liver |" in text
    assert "| seed 0 nnUNetTrainer | 100 | 10 | all structures |" in text


def test_training_entry_keeps_the_thread_count_of_omp_num_threads(monkeypatch):
    """nnUNetv2_train -device cpu asks torch for every core; the benchmark's entry holds it to OMP_NUM_THREADS
    and otherwise runs nnU-Net's own entry point with the same arguments."""
    import sys

    import nnunetv2.run.run_training as run_training
    import torch

    trainer_script = load_benchmark("nnunet_train_threads")
    seen = {}

    def entry():  # what nnU-Net's entry does first with -device cpu
        torch.set_num_threads(64)
        seen.update(threads=torch.get_num_threads(), argv=list(sys.argv))

    before, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    monkeypatch.setattr(run_training, "run_training_entry", entry)
    monkeypatch.setattr(torch, "set_num_threads", set_num_threads)  # put back after the test
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["nnunet_train_threads.py", "930", "3d_tiny", "0", "-device", "cpu"])
    try:
        trainer_script.main()
    finally:
        set_num_threads(before)
    assert seen == {"threads": 1, "argv": ["nnUNetv2_train", "930", "3d_tiny", "0", "-device", "cpu"]}
    assert load_benchmark("converge").threaded_train()[1].endswith("nnunet_train_threads.py")
