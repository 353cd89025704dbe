"""``nnunet-ext demo``: the whole nnU-Net path on a phantom, with the stock commands underneath.

raw phantom dataset -> ``nnUNetv2_plan_and_preprocess`` -> tiny configuration -> ``nnUNetv2_train`` for
the plain baseline and our trainer(s) on the same short schedule -> ``nnUNetv2_predict`` on the test
cases -> Dice per structure (nnU-Net's evaluation) -> a table and a PNG figure.

Everything lives in ``--workdir`` (its own nnUNet_raw / nnUNet_preprocessed / nnUNet_results), so the
user's nnU-Net folders are never touched. Steps already done are skipped, so an interrupted demo resumes
where it stopped; ``--force`` starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.inference import torch_device
from nnunet_ext.core.nnunet_commands import device_arg

DATASET_ID = 990
CONFIGURATION = "3d_tiny"


def default_trainers() -> list[str]:
    """The plain baseline and our first method trainer (BA-Net), both on the demo schedule (~15 min on 2 CPU
    cores together); ``--trainers`` picks others, e.g. every ``<Trainer>_demo`` of ``nnunet_ext.trainers``."""
    import nnunet_ext.trainers as ours

    return ["nnUNetTrainer_demo", f"{ours.METHOD_TRAINERS[0].__name__}_demo"]


def run_demo(
    workdir: Path,
    trainers: list[str] | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    num_train: int = 12,
    num_test: int = 4,
    seed: int = 0,
) -> dict:

    from nnunet_ext.core.nnunet_commands import (
        RunLock,
        ext_trainer_env,
        find_trainer,
        nnunet_command,
        predict_command,
        run_logged,
        train_command,
    )
    from nnunet_ext.planning.plans import load_plans, save_plans, tiny_configuration
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    if num_train < 5 or num_test < 1:
        raise UserError(
            f"--num-train {num_train} --num-test {num_test}: nnU-Net's 5-fold split needs at least 5 training "
            "cases, and the evaluation at least 1 test case."
        )
    trainers = trainers or default_trainers()
    for t in trainers:
        find_trainer(t)
    device = str(torch_device(device))  # auto: cuda or cpu; a device this machine lacks is refused here
    workdir = Path(workdir).resolve()
    lock = RunLock(workdir / "demo.lock", f"the demo in {workdir}")
    lock.check()  # a demo still running here (or a training it started): refuse before touching anything
    if force and workdir.exists():
        if not (workdir / "demo.log").exists() and any(workdir.iterdir()):
            raise UserError(
                f"{workdir} is not a demo folder (no demo.log); refusing to delete it. Pick another --workdir."
            )
        shutil.rmtree(workdir)
    raw, pre, res = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed", workdir / "nnUNet_results"
    for folder in (raw, pre, res):
        folder.mkdir(parents=True, exist_ok=True)
    log = workdir / "demo.log"
    log.touch()
    with lock:
        env = ext_trainer_env()
        env.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
        env.setdefault("nnUNet_n_proc_DA", "2")
        env.setdefault("nnUNet_compile", "f" if device == "cpu" else "t")
        timings: dict[str, float] = {}
        total_steps = 5 + 2 * len(
            trainers
        )  # phantom, preprocess, tiny, (train, predict) x N, evaluate, figure
        step = 0

        def announce(text: str) -> None:
            nonlocal step
            step += 1
            print(f"\n[{step}/{total_steps}] {text}", flush=True)

        announce("phantom dataset")
        existing = list(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
        if existing:
            dataset_folder = existing[0]
            print(f"  exists: {dataset_folder}")
        else:
            dataset_folder = write_phantom_dataset(
                raw, DATASET_ID, kind="full", num_train=num_train, num_test=num_test, seed=seed
            )
            print(f"  wrote {dataset_folder}")
        dataset_name = dataset_folder.name

        announce("nnUNetv2_plan_and_preprocess (3d_fullres)")
        plans_file = pre / dataset_name / "nnUNetPlans.json"
        if (pre / dataset_name / "nnUNetPlans_3d_fullres").is_dir() and plans_file.is_file():
            print("  done before")
        else:
            timings["preprocess"] = run_logged(
                [
                    nnunet_command("nnUNetv2_plan_and_preprocess"),
                    "-d",
                    str(DATASET_ID),
                    "-c",
                    "3d_fullres",
                    "-np",
                    "2",
                    "--verify_dataset_integrity",
                ],
                env,
                log,
                quiet,
                lock,
            )

        announce(f"tiny configuration {CONFIGURATION}")
        plans = load_plans(plans_file)
        if CONFIGURATION not in plans["configurations"]:
            tiny_configuration(plans, "3d_fullres", CONFIGURATION)
            save_plans(plans_file, plans)
        cfg = plans["configurations"][CONFIGURATION]
        print(
            f"  patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
            f"features {cfg['architecture']['arch_kwargs']['features_per_stage']}"
        )

        predictions = {}
        for trainer in trainers:
            announce(f"nnUNetv2_train {DATASET_ID} {CONFIGURATION} 0 -tr {trainer} -device {device}")
            model = res / dataset_name / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
            if (model / "checkpoint_final.pth").is_file():
                print("  done before")
            else:
                resume = ["--c"] if (model / "checkpoint_latest.pth").is_file() else []
                cmd = train_command(DATASET_ID, CONFIGURATION, 0, trainer, device, *resume)
                timings[f"train {trainer}"] = run_logged(cmd, env, log, quiet, lock)
            announce(f"nnUNetv2_predict -tr {trainer} on {dataset_name}/imagesTs")
            out = workdir / "predictions" / trainer
            if out.is_dir() and len(list(out.glob("*.nii.gz"))) == len(
                list((dataset_folder / "labelsTs").glob("*.nii.gz"))
            ):
                print("  done before")
            else:
                cmd = predict_command(
                    dataset_folder / "imagesTs", out, DATASET_ID, CONFIGURATION, 0, trainer, device
                )
                timings[f"predict {trainer}"] = run_logged(cmd, env, log, quiet, lock)
            predictions[trainer] = out

        announce("evaluate on the test cases (nnU-Net's Dice)")
        scores = evaluate(dataset_folder, predictions)
        announce("figure")
        figure = workdir / "demo.png"
        save_figure(dataset_folder, predictions, figure)
        saved_timings = (
            json.loads((workdir / "timings.json").read_text()) if (workdir / "timings.json").is_file() else {}
        )
        saved_timings.update(timings)
        from nnunet_ext.core.io import atomic_write_json

        atomic_write_json(workdir / "timings.json", saved_timings)
        result = {"scores": scores, "timings": saved_timings, "figure": str(figure), "device": device}
        atomic_write_json(workdir / "results.json", result)
        print()
        print(format_table(scores, saved_timings))
        print(f"\nfigure: {figure}\nlog: {log}\nresults: {workdir / 'results.json'}")
        return result


def evaluate(dataset_folder: Path, predictions: dict[str, Path]) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    labels = json.loads((dataset_folder / "dataset.json").read_text())["labels"]
    names = {int(v): k for k, v in labels.items() if k not in ("background", "ignore")}
    scores = {}
    for trainer, folder in predictions.items():
        summary = folder / "summary.json"
        compute_metrics_on_folder_simple(
            str(dataset_folder / "labelsTs"), str(folder), sorted(names), str(summary), num_processes=1
        )
        mean = json.loads(summary.read_text())["mean"]
        scores[trainer] = {names[int(k)]: v["Dice"] for k, v in mean.items()}
    return scores


def format_table(scores: dict, timings: dict) -> str:
    trainers = list(scores)
    structures = list(next(iter(scores.values())))
    width = max(12, *(len(t) for t in trainers)) + 2
    lines = [f"{'Dice (test cases)':<20}" + "".join(f"{t:>{width}}" for t in trainers)]
    for s in structures:
        lines.append(f"{s:<20}" + "".join(f"{scores[t][s]:>{width}.3f}" for t in trainers))
    lines.append(
        f"{'mean':<20}"
        + "".join(f"{sum(scores[t].values()) / len(structures):>{width}.3f}" for t in trainers)
    )
    for kind in ("train", "predict"):
        row = [timings.get(f"{kind} {t}") for t in trainers]
        lines.append(
            f"{kind + ' time [s]':<20}"
            + "".join(f"{v:>{width}.0f}" if v is not None else f"{'(earlier)':>{width}}" for v in row)
        )
    return "\n".join(lines)


def save_figure(dataset_folder: Path, predictions: dict[str, Path], path: Path, cases: int = 2) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    labels_ts = sorted((dataset_folder / "labelsTs").glob("*.nii.gz"))[:cases]
    label_names = {
        int(v): k for k, v in json.loads((dataset_folder / "dataset.json").read_text())["labels"].items()
    }
    n_fg = max(label_names)
    cmap = matplotlib.colormaps["tab10"].resampled(max(n_fg + 1, 2))
    cols = 2 + len(predictions)
    fig, axes = plt.subplots(len(labels_ts), cols, figsize=(3 * cols, 3 * len(labels_ts)), squeeze=False)
    for row, label_file in enumerate(labels_ts):
        case = label_file.name[: -len(".nii.gz")]
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset_folder / "imagesTs" / f"{case}_0000.nii.gz")))
        z = int(np.argmax([(np.unique(s) > 0).sum() * 1e6 + (s > 0).sum() for s in gt]))
        panels = [("image", None), ("ground truth", gt)] + [
            (t.removesuffix("_demo"), sitk.GetArrayFromImage(sitk.ReadImage(str(p / label_file.name))))
            for t, p in predictions.items()
        ]
        for col, (title, seg) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img[z], cmap="gray", vmin=-200, vmax=300)
            if seg is not None:
                ax.imshow(
                    np.ma.masked_equal(seg[z], 0),
                    cmap=cmap,
                    vmin=0,
                    vmax=max(n_fg, 1),
                    alpha=0.5,
                    interpolation="nearest",
                )
            ax.set_title(f"{title}\n{case} z={z}" if col == 0 else title, fontsize=8)
            ax.axis("off")
    from matplotlib.patches import Patch

    handles = [Patch(color=cmap(v), alpha=0.6, label=n) for v, n in sorted(label_names.items()) if v > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _cmd_demo(args):
    run_demo(
        Path(args.workdir),
        args.trainers,
        args.device,
        args.force,
        args.quiet,
        args.num_train,
        args.num_test,
        args.seed,
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole path on a phantom: preprocess, train baseline + ours, predict, evaluate, figure",
        description="Phantom dataset -> nnUNetv2_plan_and_preprocess -> tiny configuration -> nnUNetv2_train "
        "(plain baseline and our trainers on the same short '_demo' schedule) -> nnUNetv2_predict -> Dice per "
        "structure, times, and a PNG figure. About 15 minutes on 2 CPU cores; uses a GPU when present. "
        "Resumes if interrupted.",
    )
    p.add_argument(
        "--workdir", default="nnunet_ext_demo", help="folder for everything (default ./nnunet_ext_demo)"
    )
    p.add_argument(
        "--trainers",
        nargs="+",
        help="trainers to run (default: nnUNetTrainer_demo and nnUNetTrainerBANet_demo; any trainer, e.g. "
        "nnUNetTrainerDoDNet_demo)",
    )
    p.add_argument(
        "-device", "--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)"
    )
    p.add_argument("--num-train", type=int, default=12, help="training cases of the phantom (default 12)")
    p.add_argument("--num-test", type=int, default=4, help="test cases of the phantom (default 4)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--force", action="store_true", help="delete the demo folder and start over")
    p.add_argument(
        "--quiet", action="store_true", help="do not stream nnU-Net's output (it is still in demo.log)"
    )
    p.set_defaults(func=_cmd_demo)
