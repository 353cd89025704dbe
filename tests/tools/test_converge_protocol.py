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
    never = [[0.9, 0.0] for _ in range(100)]  # b flat at 0: never learned, so not converged
    out = converge.plateau(never, ["a", "b"])
    assert out["a"]["plateaued"] and not out["b"]["plateaued"] and out["b"]["spread_last_20pct"] == 0


def _run(dice: float, plateaued: bool = True) -> dict:
    """A BA-Net comparison result in the first version's form (one training, one map)."""
    structure = {"Dice": dice, "HD95": 10 * (1 - dice), "NSD": dice}
    return {
        "trainer": "x",
        "test": {"mean": {"liver": structure}},
        "training": {"epochs": 100, "plateau": {"liver": {"plateaued": plateaued}}},
        "train_cpu_s": 600.0,
    }


def _table(text: str, metric: str) -> dict[str, list[str]]:
    """Rows of the report's ``metric`` table: first cell -> the other cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {metric} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


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
    dice = _table(text, "Dice")
    assert dice == {
        "nnUNetTrainer": ["0.850 ± 0.050"],
        "nnUNetTrainerBANet": ["0.880 ± 0.040"],
        "nnUNetTrainerBANet - nnUNetTrainer": ["+0.030 ± 0.010"],
    }
    assert _table(text, "HD95")["nnUNetTrainerBANet - nnUNetTrainer"] == ["-0.300 ± 0.100"]
    assert "| seed 1 nnUNetTrainerBANet | 100 | 10 | not: liver |" in text
    assert (
        "do not rank the models.** Not converged (not flat over the last 20% of epochs, or never learned): seed 1 nnUNetTrainerBANet: liver."
        in text
    )
    results[(1, "nnUNetTrainerBANet")] = _run(0.92)  # every training flat: no such warning
    assert "do not rank" not in converge.report(tmp_path, "banet", [0, 1, 2], results)
    assert "| seed 0 nnUNetTrainer | 100 | 10 | all structures |" in text


def _multitask_run(maps: dict[str, dict[str, float]], tasks=(None,)) -> dict:
    return {
        "trainings": [
            {
                "task": t,
                "train_cpu_s": 120.0,
                "training": {"epochs": 60, "plateau": {"a": {"plateaued": True}}},
            }
            for t in tasks
        ],
        "test": {
            mode: {"mean": {s: {"Dice": d, "HD95": 1.0, "NSD": d} for s, d in dice.items()}}
            for mode, dice in maps.items()
        },
    }


def test_multitask_report_compares_each_method_map_with_both_baselines(converge, tmp_path):
    results = {}
    for seed, shift in ((0, 0.0), (1, 0.1)):
        both = {"own": {"liver": 0.8 + shift, "spleen": 0.6}, "merged": {"liver": 0.7 + shift, "spleen": 0.6}}
        for method in ("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet", "nnUNetTrainerUniSeg"):
            results[(seed, method)] = _multitask_run(both)
        results[(seed, "nnUNetTrainer_per_task")] = _multitask_run(
            {"own": {"liver": 0.75, "spleen": 0.7}}, tasks=("liver", "spleen")
        )
        results[(seed, "nnUNetTrainer_ignore")] = _multitask_run({"map": {"liver": 0.9, "spleen": 0.5}})
    text = converge.report(tmp_path, "multitask", [0, 1], results)
    dice = _table(text, "Dice")
    assert dice["nnUNetTrainerDoDNet (own)"] == ["0.850 ± 0.050", "0.600 ± 0.000"]
    assert dice["nnUNetTrainer_per_task (own)"] == ["0.750 ± 0.000", "0.700 ± 0.000"]
    assert dice["nnUNetTrainer_ignore"] == ["0.900 ± 0.000", "0.500 ± 0.000"]
    assert dice["nnUNetTrainerUniSeg (merged) - nnUNetTrainer_per_task (own)"] == [
        "+0.000 ± 0.050",
        "-0.100 ± 0.000",
    ]
    assert dice["nnUNetTrainerTransDoDNet (own) - nnUNetTrainer_ignore"] == [
        "-0.050 ± 0.050",
        "+0.100 ± 0.000",
    ]
    # 3 methods x 2 maps x 2 baselines difference rows, 8 model maps
    assert len(dice) == 8 + 12
    # every training of the per-task baseline is listed with its task
    assert "| seed 1 nnUNetTrainer_per_task spleen | 60 | 2 | all structures |" in text


def test_derived_datasets_of_the_partial_phantom(converge, tmp_path):
    """The ignore-label and per-task training sets: the source untouched, images hard-linked, labels as
    nnU-Net needs them."""
    import json

    import numpy as np
    import SimpleITK as sitk

    from nnunet_ext.tools.phantoms import PARTIAL_LABELS, write_phantom_dataset

    source = write_phantom_dataset(
        tmp_path,
        940,
        kind="partial",
        name="ConvergePartialSeed0",
        num_train=6,
        num_test=1,
        shape=(16, 40, 40),
    )
    before = {f: f.read_bytes() for f in source.rglob("*") if f.is_file()}

    def read(folder, case):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))

    ignore = converge.write_derived(source, 950, "ignore")
    dj = json.loads((ignore / "dataset.json").read_text())
    assert ignore.name == "Dataset950_ConvergePartialSeed0Ignore"
    assert dj["labels"] == {**PARTIAL_LABELS, "ignore": 6} and dj["numTraining"] == 6
    assert "nnunet_ext_tasks" not in dj  # a plain nnUNetTrainer dataset
    for case in ("liver_000", "kidney_001", "spleen_002"):
        task_labels, full, out = (
            read(source / "labelsTr", case),
            read(source / "labelsTr_full", case),
            read(ignore / "labelsTr", case),
        )
        assert np.array_equal(out[task_labels > 0], task_labels[task_labels > 0])  # annotations kept
        unannotated = (task_labels == 0) & (full > 0)
        assert unannotated.any() and (out[unannotated] == 6).all()  # the other tasks' structures ignored
        assert (out[full == 0] == 0).all()  # true background stays background
        image = f"{case}_0000.nii.gz"
        assert (ignore / "imagesTr" / image).stat().st_ino == (source / "imagesTr" / image).stat().st_ino

    kidney = converge.write_derived(source, 970, "task:kidney")
    dj = json.loads((kidney / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "kidney": 1, "kidney_tumour": 2} and dj["numTraining"] == 2
    assert sorted(f.name for f in (kidney / "labelsTr").iterdir()) == [
        "kidney_001.nii.gz",
        "kidney_004.nii.gz",
    ]
    original, renumbered = read(source / "labelsTr", "kidney_001"), read(kidney / "labelsTr", "kidney_001")
    assert set(np.unique(original)) == {0, 3, 4}
    assert np.array_equal(renumbered, np.select([original == 3, original == 4], [1, 2], 0))

    with pytest.raises(ValueError, match="task:<one of"):
        converge.write_derived(source, 990, "task:lung")
    assert {f: f.read_bytes() for f in source.rglob("*") if f.is_file()} == before  # the source untouched


def test_command_line_refuses_unknown_models_and_seeds_without_ids(converge, capsys):
    with pytest.raises(SystemExit):
        converge.main(["banet", "--models", "nnUNetTrainerDoDNet", "--report-only"])
    assert "banet has no model nnUNetTrainerDoDNet; its models: nnUNetTrainer nnUNetTrainerBANet" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        converge.main(["multitask", "--seeds", "12", "--report-only"])
    assert "seeds are 0-9" in capsys.readouterr().err


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
