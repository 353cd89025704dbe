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


def test_dense_training_set_of_the_sparse_phantom(converge, tmp_path):
    """(d) fully supervised: the sparse phantom's images and its dense truth, no ignore label."""
    import json

    from nnunet_ext.tools.phantoms import FULL_LABELS, write_phantom_dataset

    source = write_phantom_dataset(
        tmp_path, 700, kind="sparse", name="S", num_train=3, num_test=1, shape=(16, 40, 40), every=4
    )
    before = {f: f.read_bytes() for f in source.rglob("*") if f.is_file()}
    dense = converge.write_derived(source, 720, "dense")
    dj = json.loads((dense / "dataset.json").read_text())
    assert dense.name == "Dataset720_SDense" and dj["labels"] == FULL_LABELS and dj["numTraining"] == 3
    assert "nnunet_ext_phantom" not in dj  # not a sparse phantom any more
    for label in (source / "labelsTr_dense").iterdir():
        assert (dense / "labelsTr" / label.name).read_bytes() == label.read_bytes()
        image = label.name.replace(".nii.gz", "_0000.nii.gz")
        assert (dense / "imagesTr" / image).stat().st_ino == (source / "imagesTr" / image).stat().st_ino
    assert not (dense / "imagesTs").exists()  # scored on the source's test cases
    assert {f: f.read_bytes() for f in source.rglob("*") if f.is_file()} == before


def test_labelprop_comparisons_and_their_dataset_ids(converge, tmp_path):
    """Every k-th slice (4 and 8), four models; the recipe's datasets are found once it has written them, and
    no two seeds, methods or k share an id."""
    spec = converge.COMPARISONS["labelprop8"]
    assert (spec.kind, spec.every, spec.first_id) == ("sparse", 8, 710)
    assert [m.name for m in spec.models] == [
        "a_ignore_label",
        "b_nearest_1round",
        "c_shape_1round",
        "d_fully_supervised",
    ]
    ids = [c.first_id + s for c in converge.COMPARISONS.values() for s in range(10)]
    ids += [converge.DENSE_ID + s for s in range(10)]
    ids += [first + 2 * s + r for first in converge.RECIPE_ID.values() for s in range(10) for r in (0, 1)]
    ids += [converge.IGNORE_ID + s for s in range(10)]
    ids += [converge.TASK_ID + 10 * i + s for i in range(3) for s in range(10)]
    assert len(ids) == len(set(ids))

    raw = tmp_path / "raw"
    (raw / "Dataset711_ConvergeSparse8Seed1").mkdir(parents=True)
    env = {"nnUNet_raw": str(raw)}
    model = spec.model("c_shape_1round")
    source, trained = converge.trainings(tmp_path, "labelprop8", model, 1, env, tmp_path / "log")
    assert source.name == "Dataset711_ConvergeSparse8Seed1" and trained == []  # the recipe has not run
    (raw / "Dataset662_ConvergeSparse8Seed1Interp").mkdir()
    (raw / "Dataset663_ConvergeSparse8Seed1Round1").mkdir()
    _, trained = converge.trainings(tmp_path, "labelprop8", model, 1, env, tmp_path / "log")
    assert [(t.dataset_id, t.dataset.name, t.task) for t in trained] == [
        (662, "Dataset662_ConvergeSparse8Seed1Interp", "model_A"),
        (663, "Dataset663_ConvergeSparse8Seed1Round1", "model_B"),
    ]


def test_labelprop_report_compares_the_recipes_with_both_baselines(converge, tmp_path):
    results = {}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for name, dice in (
            ("a_ignore_label", 0.70),
            ("b_nearest_1round", 0.80),
            ("c_shape_1round", 0.84),
            ("d_fully_supervised", 0.90),
        ):
            run = _multitask_run({"map": {"vessel": dice + shift}}, tasks=("model_A", "model_B"))
            if name.startswith(("b", "c")):  # the recipe's time sits on model B
                run["trainings"][0].update(cpu_in="model_B (the whole recipe)", train_cpu_s=None)
                run["trainings"][1].update(train_cpu_s=1800.0, cpu_covers="the whole recipe")
            else:
                run["trainings"] = run["trainings"][:1]
                run["trainings"][0]["task"] = None
            results[(seed, name)] = run
    text = converge.report(tmp_path, "labelprop4", [0, 1], results)
    dice = _table(text, "Dice")
    assert dice["c_shape_1round"] == ["0.850 ± 0.010"]
    assert dice["c_shape_1round - a_ignore_label"] == ["+0.140 ± 0.000"]
    assert dice["b_nearest_1round - d_fully_supervised"] == ["-0.100 ± 0.000"]
    assert len(dice) == 4 + 4
    assert "| seed 0 b_nearest_1round model_A | 60 | in model_B (the whole recipe) | all structures |" in text
    assert "| seed 0 b_nearest_1round model_B | 60 | 30 (the whole recipe) | all structures |" in text


def test_planning_leaves_the_ignore_label_out_of_the_fingerprint(converge, tmp_path, monkeypatch):
    """A dataset with the ignore label is planned after `nnunet-ext fingerprint` (as the recipe plans its
    own); one without it with the stock command alone."""
    import json

    import nnunet_ext.core.nnunet_commands as commands
    import nnunet_ext.planning.plans as plans

    calls = []
    monkeypatch.setattr(commands, "run_logged", lambda cmd, env, log, quiet=False: calls.append(cmd[1:]))
    monkeypatch.setattr(plans, "load_plans", lambda f: {"configurations": {"3d_converge": {}}})
    raw = tmp_path / "raw"
    for dataset_id, labels in (
        (700, {"background": 0, "a": 1, "ignore": 2}),
        (930, {"background": 0, "a": 1}),
    ):
        folder = raw / f"Dataset{dataset_id}_X"
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre")}
    converge.plan(700, env, tmp_path / "log")
    assert calls == [
        ["-d", "700", "-np", "1", "--verify_dataset_integrity"],
        ["fingerprint", "-d", "700", "-np", "1", "--no-extract"],
        ["-d", "700", "-c", "3d_fullres", "-np", "1"],
    ]
    calls.clear()
    converge.plan(930, env, tmp_path / "log")
    assert calls == [["-d", "930", "-c", "3d_fullres", "-np", "1"]]


def test_planning_adds_the_converge_configuration_once(converge, tmp_path, monkeypatch):
    """plan() applies the plans preset `converge` to nnU-Net's plans (3d_converge: 16 x 32 x 32 crops) and
    leaves plans that already have it alone."""
    import json
    import shutil

    from support.paths import DATA

    import nnunet_ext.core.nnunet_commands as commands

    monkeypatch.setattr(commands, "run_logged", lambda cmd, env, log, quiet=False: None)
    raw, pre = tmp_path / "raw" / "Dataset930_X", tmp_path / "pre" / "Dataset930_X"
    raw.mkdir(parents=True)
    pre.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    shutil.copy(DATA / "nnUNetPlans.json", pre / "nnUNetPlans.json")
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")}
    plans_file = converge.plan(930, env, tmp_path / "log")
    cfg = json.loads(plans_file.read_text())["configurations"][converge.CONFIGURATION]
    assert converge.CONFIGURATION == "3d_converge" and cfg["patch_size"] == [16, 32, 32]
    before = plans_file.stat().st_mtime_ns
    converge.plan(930, env, tmp_path / "log")
    assert plans_file.stat().st_mtime_ns == before


def _medseqft_run(shift: float, converged_: bool = True) -> dict:
    def strategy(diag: float, last: list[float]) -> dict:
        matrix = [[diag], [last[0], diag], [*last, diag]]
        final = sum(matrix[-1]) / 3
        bwt = ((last[0] - diag) + (last[1] - diag)) / 2
        return {"matrix": matrix, "final": final, "bwt": bwt}

    plateau = {"liver": {"plateaued": converged_}}
    return {
        "strategies": {
            "medseqft": strategy(0.9, [0.8 + shift, 0.85]),
            "medseqft_noexpert": strategy(0.9, [0.7, 0.8]),
            "sequential": strategy(0.9, [0.5 + shift, 0.6]),
            "parallel": strategy(0.9, [0.9, 0.9]),
        },
        "trainings": [{"task": "medseqft Task800 x", "training": {"epochs": 60, "plateau": plateau}}],
        "train_cpu_s": 3600.0,
        "resumed": False,
    }


def test_medseqft_report_gives_final_dice_backward_transfer_and_paired_differences(converge):
    results = {0: _medseqft_run(0.0), 1: _medseqft_run(0.1, converged_=False)}
    text = converge.medseqft_report([0, 1, 2], results)
    assert "seeds with the run finished: [0, 1] (of [0, 1, 2])" in text
    rows = _table(text, "strategy (Dice of the final model)")
    # columns: task 1, task 2, task 3, final mean Dice, backward transfer
    assert rows["medseqft"][0] == "0.850 ± 0.050" and rows["medseqft"][4] == "-0.050 ± 0.025"
    assert rows["parallel"][3] == "0.900 ± 0.000" and rows["parallel"][4] == "+0.000 ± 0.000"
    assert rows["medseqft - sequential"][0] == "+0.300 ± 0.000"
    assert rows["medseqft - parallel"][1] == "-0.050 ± 0.000"
    assert rows["medseqft_noexpert - sequential"][4] == "+0.175 ± 0.025"
    assert len(rows) == 4 + 4
    assert (
        "do not rank the strategies.** Not converged" in text and "seed 1 medseqft Task800 x: liver" in text
    )
    assert "| seed 0 medseqft Task800 x | 60 | all structures |" in text
    assert "seed 0: 60, seed 1: 60" in text
    assert converge.medseqft_report([3], results).endswith("finished: none (of [3])\n")


def test_medseqft_comparison_takes_no_models(converge, capsys):
    with pytest.raises(SystemExit):
        converge.main(["medseqft", "--models", "sequential", "--report-only"])
    assert "--models does not apply" in capsys.readouterr().err


def test_medseqft_task_ids_are_their_own(converge):
    ids = [converge.MEDSEQFT_ID + 3 * s + i for s in range(10) for i in range(3)]
    others = [c.first_id + s for c in converge.COMPARISONS.values() for s in range(10)]
    others += [converge.DENSE_ID + s for s in range(10)] + [converge.IGNORE_ID + s for s in range(10)]
    others += [first + 2 * s + r for first in converge.RECIPE_ID.values() for s in range(10) for r in (0, 1)]
    others += [converge.TASK_ID + 10 * i + s for i in range(3) for s in range(10)]
    assert len(set(ids)) == 30 and not set(ids) & set(others)
