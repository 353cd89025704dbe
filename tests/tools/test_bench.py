"""The benchmark harness measures our trainer and the baseline in one run and reports ratios."""

from __future__ import annotations

import json

import pytest
from support.paths import DATA

from nnunet_ext.cli import main


@pytest.mark.slow
def test_bench_reports_both_trainers_and_ratios(phantom_workspace, monkeypatch, tmp_path, capsys):
    phantom_workspace.dataset(501)
    for key, value in phantom_workspace.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "501",
            "3d_tiny",
            "-tr",
            "nnUNetTrainerBANet",
            "--device",
            "cpu",
            "--iterations",
            "1",
            "--warmup",
            "1",
            "--cases",
            "1",
            "--rounds",
            "2",
            "--steps-per-round",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "ratio" in text and "nnUNetTrainerBANet" in text and "nnUNetTrainer" in text
    r = json.loads(out.read_text())
    assert r["baseline"]["trainer"] == "nnUNetTrainer" and r["trainer"]["trainer"] == "nnUNetTrainerBANet"
    assert r["trainer"]["train_step_s"] > 0 and r["trainer"]["inference_s_per_case"] > 0
    # BA-Net has a second decoder: more parameters than the plain U-Net on the same plans
    assert r["ratios"]["parameters"] > 1.2
    # the device-independent memory estimate: SGD with momentum holds weights, gradients and one buffer
    for side in ("baseline", "trainer"):
        expected_state = 3 * 4 * r[side]["parameters"] / 2**20  # float32
        assert abs(r[side]["state_memory_mb"] - expected_state) < 0.01 * expected_state
        assert r[side]["activation_memory_mb"] > 0
    # ... and the second decoder's activations and weights make BA-Net's estimate larger
    assert r["ratios"]["memory_estimate_mb"] > 1.1
    # ... and the second decoder's convolutions its FLOPs (counted, device-independent)
    assert r["ratios"]["train_step_gflop"] > 1.2 and r["baseline"]["train_step_gflop"] > 0
    # interleaved timing: both trainers in one process, the ratio is the median over the rounds
    inter = r["interleaved"]
    assert inter["rounds"] == 2 and inter["baseline_step_s"] > 0 and inter["trainer_step_s"] > 0
    assert inter["ratio_min"] <= inter["ratio_median"] <= inter["ratio_max"]
    assert r["ratios"]["train_step_interleaved_s"] == inter["ratio_median"]
    # on CPU, process CPU time per step (one torch thread) is reported next to wall time
    assert inter["threads"] == 1 and r["trainer"]["threads"] == 1
    assert r["trainer"]["train_step_cpu_s"] > 0 and inter["trainer_step_cpu_s"] > 0
    assert r["ratios"]["train_step_interleaved_cpu_s"] == inter["cpu_ratio_median"]
    assert "interleaved" in text and "memory estimate" in text
    # the user's results folder is untouched: trainer outputs went to a temporary folder
    assert not list((phantom_workspace.root / "results").glob("*/nnUNetTrainerBANet__*"))


def test_bench_unknown_trainer_is_a_clear_error(tmp_path, capsys):
    import shutil

    data = DATA
    folder = tmp_path / "Dataset001_Blob"
    folder.mkdir()
    shutil.copy(data / "nnUNetPlans.json", folder)
    shutil.copy(data / "dataset.json", folder)
    assert main(["bench", str(folder / "nnUNetPlans.json"), "3d_fullres", "-tr", "nnUNetTrainerNope"]) == 1
    assert "trainer 'nnUNetTrainerNope' not found" in capsys.readouterr().err
