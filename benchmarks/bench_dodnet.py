"""DoDNet / TransDoDNet benchmarks on the partially labelled phantom (nnU-Net's 3d_tiny configuration).

    python benchmarks/bench_dodnet.py                       # all parts, CPU defaults
    python benchmarks/bench_dodnet.py --parts speed infer   # skip the (slow) accuracy part
    python benchmarks/bench_dodnet.py --iterations 300 --device cuda

1. speed: `nnunet-ext bench` (nnunet_ext.tools.bench.run_benchmark): train-step time, peak memory and inference time
   per case of nnUNetTrainerDoDNet / nnUNetTrainerTransDoDNet vs nnUNetTrainer on the same plans.
2. infer: sliding-window inference time per case (nnU-Net's predictor, no mirroring) of the universal prediction
   (all tasks from one backbone pass) vs one single-task prediction vs T single-task predictions.
3. accuracy: Dice per structure on the test cases (full truth in labelsTs) of DoDNet / TransDoDNet trained on all
   tasks (fold 'all', then the end-of-training validation that stores the cross-task weights) vs plain nnU-Nets
   trained per task on that task's cases, with the same TOTAL number of iterations (each plain net gets 1/T of
   them). The multi-task models are scored three ways (own-task prediction, merged map with exact decoding,
   stock nnUNetv2_predict map; :func:`score_multitask`). ``--seed`` changes the training seed.

Prints a machine line and the tables; writes <workdir>/bench_dodnet.json. Copy them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

DATASET_ID = 982
TASK_IDS = {"liver": 983, "kidney": 984, "spleen": 985}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def _run(cmd: list[str]) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    # training in this process sets nnUNet_n_proc_DA=0, with which nnU-Net's planning crashes
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    subprocess.run(
        [str(exe) if exe.exists() else cmd[0], *cmd[1:]],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )


def prepare(
    workdir: Path,
    dataset_id: int,
    raw_source: Path | None = None,
    task: str | None = None,
    profile: str = "standard",
) -> Path:
    """Raw + preprocessed + 3d_tiny for the partial phantom, or (task given) a per-task subset of it whose labels
    are renumbered 1..n in the task's order. Returns the preprocessed folder."""
    from nnunet_ext.planning.plans import load_plans, save_plans, tiny_configuration
    from nnunet_ext.tools.phantoms import PARTIAL_LABELS, write_phantom_dataset

    raw, pre = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed"
    for folder in (raw, pre, workdir / "nnUNet_results"):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(workdir / "nnUNet_results")
    )
    existing = list(pre.glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans.json"))
    if existing:
        return existing[0].parent
    if task is None:
        write_phantom_dataset(
            raw, dataset_id, kind="partial", num_train=12, num_test=6, seed=0, force=True, profile=profile
        )
    else:
        import SimpleITK as sitk

        from nnunet_ext.tools.phantoms import PARTIAL_TASKS

        names = PARTIAL_TASKS[task]["labels"]
        target = raw / f"Dataset{dataset_id:03d}_Phantom{task.capitalize()}"
        shutil.rmtree(target, ignore_errors=True)
        for sub in ("imagesTr", "labelsTr"):
            (target / sub).mkdir(parents=True)
        lut = np.zeros(max(PARTIAL_LABELS.values()) + 1, np.uint8)
        for i, n in enumerate(names):
            lut[PARTIAL_LABELS[n]] = i + 1
        cases = sorted(p.name[: -len(".nii.gz")] for p in (raw_source / "labelsTr").glob(f"{task}_*.nii.gz"))
        for c in cases:
            shutil.copy2(
                raw_source / "imagesTr" / f"{c}_0000.nii.gz", target / "imagesTr" / f"{c}_0000.nii.gz"
            )
            im = sitk.ReadImage(str(raw_source / "labelsTr" / f"{c}.nii.gz"))
            out = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(im)])
            out.CopyInformation(im)
            sitk.WriteImage(out, str(target / "labelsTr" / f"{c}.nii.gz"))
        (target / "dataset.json").write_text(
            json.dumps(
                {
                    "channel_names": {"0": "CT"},
                    "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
                    "numTraining": len(cases),
                    "file_ending": ".nii.gz",
                }
            )
        )
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "2"])
    plans_file = next(pre.glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans.json"))
    plans = load_plans(plans_file)
    tiny_configuration(plans)
    save_plans(plans_file, plans)
    return plans_file.parent


def make_trainer(pre: Path, trainer: str, device: torch.device, epochs: int = 1, iterations: int = 1):
    from nnunet_ext.core.nnunet_commands import find_trainer

    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    t = find_trainer(trainer)(plans=deepcopy(plans), configuration="3d_tiny", fold="all", dataset_json=dataset_json,
                              device=device)  # fmt: skip
    t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch = epochs, iterations, 1
    return t


def predictor_for(trainer, device):
    """nnU-Net's predictor (no mirroring) around the trainer's network, with its trained weights as the one
    parameter set (predict_single_npy_array loads each set)."""
    from nnunet_ext.core.inference import predictor_for_network

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    weights = [{k: v.detach().clone() for k, v in trainer.network.state_dict().items()}]
    return predictor_for_network(
        trainer.network, trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json,
        type(trainer).__name__, trainer.inference_allowed_mirroring_axes, device, parameters=weights, tta=False,
    )  # fmt: skip


def part_speed(pre: Path, args) -> dict:
    from nnunet_ext.tools.bench import format_report, run_benchmark

    out = {}
    for trainer in ("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet"):
        r = run_benchmark(
            pre / "nnUNetPlans.json", "3d_tiny", trainer, device=args.device, iterations=args.speed_iterations,
            warmup=2, cases=2, no_mirroring=True, rounds=args.rounds, threads=args.threads,
        )  # fmt: skip
        print(format_report(r), flush=True)
        out[trainer] = r
    return out


def part_infer(pre: Path, raw: Path, device: torch.device, repeats: int) -> dict:
    import SimpleITK as sitk

    out = {}
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[:2]
    for trainer in ("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet"):
        t = make_trainer(pre, trainer, device)
        t.initialize()
        p = predictor_for(t, device)
        net = t.network
        data = [
            torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[None].astype(np.float32))
            for f in images
        ]
        times = infer_times(p, net, data, repeats)
        out[trainer] = times
        print(trainer, {k: f"{v:.2f} s/case" for k, v in times.items()}, flush=True)
    return out


def infer_times(p, net, data, repeats: int) -> dict:
    """Seconds per case of the score pass of `nnunet-ext predict` (nnU-Net's sliding window, every task's
    probabilities from one backbone pass) for all tasks, one task, and each task separately."""
    from nnunet_ext.multitask.predict import predict_task_scores

    times = {}
    for mode, selections in (
        ("all tasks (1 pass)", [None]),
        ("one task", [[0]]),
        ("each task separately", [[i] for i in range(net.num_tasks)]),
    ):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for x in data:
                for sel in selections:
                    predict_task_scores(p, x, sel)
            best = min(best, (time.perf_counter() - start) / len(data))
        times[mode] = best
    return times


def train(
    pre: Path, trainer: str, device, epochs: int, iterations: int, seed: int = 0, validate: bool = False
):
    """Train in-process with nnU-Net's loop on fold 'all'; returns (trainer, seconds). ``validate``: run the
    end-of-training validation (multi-task models: own-task maps and the stored cross-task weights; with fold
    'all' the validation cases are the training cases), else it is skipped (the benchmark scores the test
    cases itself)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    t = make_trainer(pre, trainer, device, epochs, iterations)
    os.environ["nnUNet_n_proc_DA"] = "0"
    validation = t.perform_actual_validation
    t.perform_actual_validation = lambda *a, **k: None
    start = time.perf_counter()
    t.run_training()
    if validate:
        validation()
    return t, time.perf_counter() - start


def _dice_from_folder(folder: Path, test_images, truths, labels) -> dict:
    import SimpleITK as sitk

    dice = {u: [] for u in labels}
    for img, truth in zip(test_images, truths):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / img.name.replace("_0000", ""))))
        for u in labels:
            a, b = seg == u, truth == u
            if a.sum() + b.sum():
                dice[u].append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return {str(u): float(np.mean(v)) if v else float("nan") for u, v in dice.items()}


def score_multitask(model: Path, device, raw: Path) -> dict:
    """Dice per structure of a trained multi-task model folder (fold 'all') on the test cases, three ways:
    each structure from its own task's prediction (`nnunet-ext predict --per-task`); the merged all-task map
    with exact decoding and the stored cross-task weights (`nnunet-ext predict`); the stock
    `nnUNetv2_predict` map (network(x), nnU-Net averages the merge logits)."""
    from nnunet_ext.multitask.predict import load_predictor, predict_tasks

    test_images, truths = test_set(raw)
    p, layout = load_predictor(model, ("all",), device=device.type, tta=False)
    all_labels = [v for labs in layout.labels for v in labs]
    stock = predict_and_score(p, test_images, truths, {v: v for v in all_labels})
    out = model / "bench_predictions"
    shutil.rmtree(out, ignore_errors=True)
    predict_tasks(p, layout, raw / "imagesTs", out / "merged")
    predict_tasks(p, layout, raw / "imagesTs", out / "own", per_task=True)
    merged = _dice_from_folder(out / "merged", test_images, truths, all_labels)
    own = {}
    for task, labs in zip(layout.tasks, layout.labels):
        own.update(_dice_from_folder(out / "own" / task, test_images, truths, labs))
    weights = json.loads((out / "merged" / "nnunet_ext_predict.json").read_text())["merge_weights"]
    return {
        "own task": own,
        "merged (exact)": merged,
        "merged (stock nnUNetv2_predict)": stock,
        "weights": weights,
    }


def predict_and_score(predictor, test_images, truths, label_map) -> dict:
    """Predict the test images, Dice per unified label in ``label_map`` (model label -> unified label), each
    case scored on the labels present in its truth or its prediction."""
    import SimpleITK as sitk

    dice = {u: [] for u in label_map.values()}
    for img, truth in zip(test_images, truths):
        image = sitk.ReadImage(str(img))
        seg = predictor.predict_single_npy_array(
            sitk.GetArrayFromImage(image)[None].astype(np.float32),
            {"spacing": list(image.GetSpacing())[::-1]},
            None, None, False,
        )  # fmt: skip
        for m, u in label_map.items():
            a, b = seg == m, truth == u
            if a.sum() + b.sum():
                dice[u].append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return {str(u): float(np.mean(v)) if v else float("nan") for u, v in dice.items()}


def train_and_score(
    pre: Path, trainer: str, device, epochs: int, iterations: int, test_images, truths, label_map
):
    """:func:`train`, then :func:`predict_and_score` with the trained weights; returns (Dice, seconds)."""
    t, train_s = train(pre, trainer, device, epochs, iterations)
    return predict_and_score(predictor_for(t, device), test_images, truths, label_map), train_s


def test_set(raw: Path) -> tuple[list[Path], list[np.ndarray]]:
    """The phantom's test images and their full truth (every structure labelled)."""
    import SimpleITK as sitk

    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    truths = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f.name.replace("_0000", ""))))
        for f in images
    ]
    return images, truths


def per_task_baselines(
    workdir: Path, raw: Path, device, epochs: int, total_per_epoch: int, test_images, truths
) -> dict:
    """One plain nnUNetTrainer per task, trained on that task's cases only with 1/T of the iterations per epoch
    (so the T of them train as many iterations in total as one all-task model); Dice per unified label."""
    from nnunet_ext.tools.phantoms import PARTIAL_LABELS, PARTIAL_TASKS

    plain = {}
    for task, tid in TASK_IDS.items():
        tpre = prepare(workdir, tid, raw, task)
        names = PARTIAL_TASKS[task]["labels"]
        label_map = {i + 1: PARTIAL_LABELS[n] for i, n in enumerate(names)}
        d, secs = train_and_score(
            tpre,
            "nnUNetTrainer",
            device,
            epochs,
            max(1, total_per_epoch // len(TASK_IDS)),
            test_images,
            truths,
            label_map,
        )
        print(f"nnUNetTrainer ({task} only)", d, f"{secs:.0f} s", flush=True)
        plain.update(d)
    return plain


ACCURACY_MODELS = ("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet", "per-task")


def part_accuracy(
    pre: Path,
    raw: Path,
    workdir: Path,
    device,
    total_iterations: int,
    epochs: int,
    models=ACCURACY_MODELS,
    seed: int = 0,
) -> dict:
    test_images, truths = test_set(raw)
    per_iter = max(1, total_iterations // epochs)
    results = {}
    for trainer in [m for m in ("nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet") if m in models]:
        t, secs = train(pre, trainer, device, epochs, per_iter, seed=seed, validate=True)
        results[trainer] = score_multitask(Path(t.output_folder_base), device, raw)
        results[trainer]["train_seconds"] = secs
        print(trainer, json.dumps(results[trainer]), f"{secs:.0f} s", flush=True)
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
    parser.add_argument(
        "--rounds", type=int, default=10, help="interleaved timing rounds (speed part; 0: skip)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 on a shared machine: read CPU-time rows)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--iterations", type=int, default=150, help="total training iterations (accuracy part)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="torch / numpy seed of the accuracy trainings")
    parser.add_argument(
        "--profile",
        default="standard",
        choices=["standard", "converge"],
        help="phantom profile (converge: the convergence benchmarks, docs/phantoms.md; use a new --workdir)",
    )
    parser.add_argument(
        "--accuracy-models",
        nargs="+",
        default=list(ACCURACY_MODELS),
        choices=ACCURACY_MODELS,
        help="which models the accuracy part trains (per-task: one plain nnUNetTrainer per task)",
    )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(
            args.threads
        )  # the in-process parts (infer, accuracy); speed passes it to its workers
    workdir = Path(args.workdir).resolve()
    os.environ.setdefault("nnUNet_compile", "f")
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
            pre, raw, workdir, device, args.iterations, args.epochs, args.accuracy_models, args.seed
        )
    from nnunet_ext.core.io import atomic_write_json

    name = f"bench_dodnet_seed{args.seed}.json" if args.seed else "bench_dodnet.json"
    atomic_write_json(workdir / name, report)
    print(f"wrote {workdir / name}")


if __name__ == "__main__":
    main()
