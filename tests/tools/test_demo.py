"""`nnunet-ext demo` (the README's first command) end to end, with short schedules, and its resume."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.commands import BIN, run


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    import os

    import nnunet_ext

    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_compile="f", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), nnUNet_n_proc_DA="1")
    workdir = tmp_path / "demo"
    cmd = ["nnunet-ext", "demo", "--workdir", str(workdir), "--device", "cpu", "--quiet"]
    # one trainer (the method) keeps this test short; the loop over several trainers is the same code path
    cmd += [
        "--trainers",
        "nnUNetTrainerBANet_smoke",
        "--num-train",
        "5",
        "--num-test",
        "1",
    ]
    first = run(cmd, env)
    result = json.loads((workdir / "results.json").read_text())
    assert set(result["scores"]) == {"nnUNetTrainerBANet_smoke"}
    for scores in result["scores"].values():
        assert {"liver", "kidney", "spleen"} <= set(scores)
        assert all(v != v or 0.0 <= v <= 1.0 for v in scores.values())  # Dice, NaN if absent in truth
    assert (workdir / "demo.png").stat().st_size > 1000
    assert "train nnUNetTrainerBANet_smoke" in result["timings"]
    assert "nnUNetTrainerBANet_smoke" in first.stdout
    assert nnunet_ext.trainer_dir()  # the demo found our trainers without the user exporting anything

    # too few training cases for nnU-Net's 5-fold split: a clear error before any work
    bad = subprocess.run(
        [str(BIN / "nnunet-ext"), *cmd[1:3], str(tmp_path / "other"), *cmd[4:-4], "--num-train", "4"],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    assert bad.returncode == 1 and "--num-train 4" in bad.stderr and "at least 5" in bad.stderr
    assert not (tmp_path / "other").exists()

    # a second call resumes: nothing is trained or predicted again
    again = run(cmd, env)
    assert again.stdout.count("done before") >= 3  # preprocessing, training, prediction
