"""Label propagation benchmark (docs/labelprop.md, docs/benchmarks.md "## Label propagation").

    python benchmarks/bench_labelprop.py --parts interp speed          # cheap: seconds to a minute
    python benchmarks/bench_labelprop.py --parts train --epochs 8     # CPU: trains 3d_tiny models

Parts:

* ``interp``: interpolation-only Dice against the dense truth (no training) of ``nearest`` vs ``shape`` on sparse
  phantoms (every 4th / 8th axial slice annotated), on the propagated slices only (between the first and the
  last annotated slice, annotated slices excluded). Dice per label over all voxels of all cases, then the mean
  over the 5 foreground labels. This decides ``labelprop``'s default method.
* ``parcellation``: the same interpolation-only Dice on synthetic parcellations (``phantoms.make_parcellation``:
  many adjacent, irregular, non-convex regions tiling an organ, like an atlas), every method of ``labelprop``
  at every 4th / 8th slice; Dice per label pooled over the cases, the mean over labels, and per case the mean
  Dice of each method (how often each method wins).
* ``speed``: CPU seconds to interpolate a 512 x 512 x 200 label volume (3 labels, every 4th slice annotated), with
  ``shape`` also on whole slices (``crop=False`` and whole-slice distance transforms: the implementation before
  the crops), and the same for a vessel-like volume (a winding tube: lumen and wall).
* ``train``: test-set Dice (dense truth ``labelsTs``) of (a) nnU-Net on the sparse labels with its ignore label,
  (b) ``nearest`` + one round (model A -> pseudo-labels -> model B), (c) ``shape`` + one round, (d) fully
  supervised, all with the tiny configuration, fold 0 of the 4-fold split and the SAME schedule per model
  (``--epochs`` x ``--iterations``; (b)/(c) train two models of that schedule). Models are trainer classes
  written to ``<workdir>/trainers`` and found through ``nnUNet_extTrainer``.

Everything is written under ``--workdir`` (own nnUNet_raw/preprocessed/results); results go to
``<workdir>/bench_labelprop.json`` and are printed as markdown tables with the machine line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_ext.core.io import atomic_write_json

FG = {"liver": 1, "kidney": 2, "spleen": 3, "tumour": 4, "vessel": 5}
SPARSE_IDS = {4: 810, 8: 820}
FULL_ID = 830


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_table(pairs) -> dict:
    """Dice per label over all (truth, prediction[, mask]) pairs pooled, plus the mean over labels."""
    inter = {k: 0 for k in FG}
    total = {k: 0 for k in FG}
    for truth, pred in pairs:
        for k, v in FG.items():
            t, p = truth == v, pred == v
            inter[k] += int(np.logical_and(t, p).sum())
            total[k] += int(t.sum() + p.sum())
    out = {k: (2 * inter[k] / total[k] if total[k] else float("nan")) for k in FG}
    out["mean"] = float(np.nanmean([out[k] for k in FG]))
    return out


def setup_env(workdir: Path) -> None:
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
        os.environ[sub] = str(workdir / sub)
    os.environ.setdefault("nnUNet_compile", "f")


def sparse_dataset(workdir: Path, every: int, args) -> Path:
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    found = list((workdir / "nnUNet_raw").glob(f"Dataset{SPARSE_IDS[every]}_*"))
    if found:
        return found[0]
    return write_phantom_dataset(
        workdir / "nnUNet_raw",
        SPARSE_IDS[every],
        kind="sparse",
        name=f"BenchSparse{every}",
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        every=every,
    )


# ----------------------------------------------------------------------------------------- interpolation
def bench_interp(workdir: Path, args) -> dict:
    from nnunet_ext.labelprop.propagate import interpolate_volume, load_sparse_dataset

    results = {}
    for every in args.every:
        src = sparse_dataset(workdir, every, args)
        ds = load_sparse_dataset(src)
        for method in ("nearest", "shape"):
            pairs, t0 = [], time.perf_counter()
            for case in ds.cases:
                lab = read(case.label)
                dense = read(src / "labelsTr_dense" / case.label.name)
                out = interpolate_volume(lab, case.annotated, ds.axis, method, case.spacing_zyx, "ignore", 6)
                ann = case.annotated
                propagated = [s for s in range(ann[0], ann[-1] + 1) if s not in set(ann)]
                pairs.append((dense[propagated], out[propagated]))
            seconds = time.perf_counter() - t0
            results[f"every{every}/{method}"] = {**dice_table(pairs), "seconds": round(seconds, 2)}
            print(f"interp every {every} {method}: {results[f'every{every}/{method}']}", flush=True)
    return results


def _confusion(truth: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(
        truth.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel(), minlength=n * n
    ).reshape(n, n)


def _dice_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Dice of labels 1..n-1 (nan where a label is in neither volume)."""
    tp = np.diag(conf)[1:].astype(float)
    denom = conf.sum(axis=0)[1:] + conf.sum(axis=1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def bench_parcellation(args) -> dict:
    """nearest vs shape on synthetic parcellations: Dice on the propagated slices only."""
    from nnunet_ext.labelprop.propagate import METHODS, interpolate_volume
    from nnunet_ext.tools.phantoms import make_parcellation

    shape, spacing, k = tuple(args.parc_shape), tuple(args.parc_spacing), args.parc_labels
    n = k + 1
    vols = [
        make_parcellation(np.random.default_rng([args.seed, i]), shape, spacing, k, args.parc_warp)
        for i in range(args.parc_cases)
    ]
    res: dict = {
        "cases": args.parc_cases,
        "shape_zyx": list(shape),
        "spacing_zyx": list(spacing),
        "labels": k,
        "warp_mm": args.parc_warp,
        "seed": args.seed,
    }
    for every in args.every:
        conf = {m: np.zeros((n, n), np.int64) for m in METHODS}
        per_case = {m: [] for m in METHODS}
        seconds = dict.fromkeys(METHODS, 0.0)
        for i, vol in enumerate(vols):
            ann = list(range(i % every, shape[0], every))
            sparse = np.full_like(vol, n)  # ignore = k + 1
            sparse[ann] = vol[ann]
            propagated = [s for s in range(ann[0], ann[-1] + 1) if s not in set(ann)]
            for m in METHODS:
                t0 = time.process_time()
                out = interpolate_volume(sparse, ann, 0, m, spacing, "ignore", n)
                seconds[m] += time.process_time() - t0
                c = _confusion(vol[propagated], out[propagated], n + 1)[:n, :n]
                conf[m] += c
                per_case[m].append(float(np.nanmean(_dice_from_confusion(c))))
        for m in METHODS:
            dice = _dice_from_confusion(conf[m])
            others = [o for o in METHODS if o != m]
            wins = sum(all(per_case[m][i] > per_case[o][i] for o in others) for i in range(len(vols)))
            res[f"every{every}/{m}"] = {
                "mean": round(float(np.nanmean(dice)), 4),
                "per_label_min": round(float(np.nanmin(dice)), 4),
                "per_case_mean": [round(v, 4) for v in per_case[m]],
                "cases_won": int(wins),
                "cpu_seconds": round(seconds[m], 2),
            }
            print(f"parcellation every {every} {m}: {res[f'every{every}/{m}']}", flush=True)
    return res


@contextlib.contextmanager
def _whole_slice_distances():
    """The implementation before the crops: every distance transform on the whole slice (scipy's, no box)."""
    from scipy.ndimage import distance_transform_edt

    import nnunet_ext.labelprop.propagate as lp

    near = lp._edt_near
    lp._edt_near = lambda mask, sampling: distance_transform_edt(mask, sampling=sampling)
    try:
        yield
    finally:
        lp._edt_near = near


def bench_speed(args) -> dict:
    from nnunet_ext.labelprop.propagate import interpolate_shape, interpolate_volume

    shape = (200, 512, 512)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    vol = np.zeros(shape, np.uint8)
    vol[((zz - 100) / 90.0) ** 2 + ((yy - 256) / 200.0) ** 2 + ((xx - 200) / 150.0) ** 2 <= 1] = 1
    vol[((zz - 90) / 60.0) ** 2 + ((yy - 256) / 80.0) ** 2 + ((xx - 350) / 90.0) ** 2 <= 1] = 2
    vol[((zz - 110) / 30.0) ** 2 + ((yy - 220) / 40.0) ** 2 + ((xx - 180) / 40.0) ** 2 <= 1] = 3
    ann = list(range(0, shape[0], 4))
    sparse = np.full_like(vol, 4)
    sparse[ann] = vol[ann]
    out = {"shape_zyx": list(shape), "annotated": len(ann), "clock": "CPU time (time.process_time)"}
    for method in ("nearest", "shape"):
        t0 = time.process_time()
        result = interpolate_volume(sparse, ann, 0, method, (1.0, 0.8, 0.8), "ignore", 4)
        out[method] = round(time.process_time() - t0, 2)
        print(f"speed {method}: {out[method]} s", flush=True)
    t0 = time.process_time()
    with _whole_slice_distances():
        whole = interpolate_shape(sparse, ann, (0.8, 0.8), crop=False)
    out["shape_whole_slices"] = round(time.process_time() - t0, 2)
    whole[: ann[0]], whole[ann[-1] + 1 :] = 4, 4
    out["shape_identical_to_whole_slices"] = bool(np.array_equal(result, whole))
    print(
        f"speed shape on whole slices: {out['shape_whole_slices']} s, identical output: "
        f"{out['shape_identical_to_whole_slices']}",
        flush=True,
    )
    # vessel-like: a carotid-sized tube (lumen radius 8, wall 3 voxels) winding through the same volume
    cy = 256 + 60 * np.sin(np.arange(shape[0]) / 30.0)
    cx = 200 + 40 * np.cos(np.arange(shape[0]) / 45.0)
    r = np.sqrt((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)
    tube = np.where(r <= 8, 1, np.where(r <= 11, 2, 0)).astype(np.uint8)
    sparse = np.full_like(tube, 4)
    sparse[ann] = tube[ann]
    t0 = time.process_time()
    result = interpolate_volume(sparse, ann, 0, "shape", (1.0, 0.8, 0.8), "ignore", 4)
    out["vessel_shape"] = round(time.process_time() - t0, 2)
    t0 = time.process_time()
    with _whole_slice_distances():
        whole = interpolate_shape(sparse, ann, (0.8, 0.8), crop=False)
    out["vessel_shape_whole_slices"] = round(time.process_time() - t0, 2)
    out["vessel_identical_to_whole_slices"] = bool(
        np.array_equal(result[ann[0] : ann[-1] + 1], whole[ann[0] : ann[-1] + 1])
    )
    print(
        f"speed vessel shape: {out['vessel_shape']} s, on whole slices {out['vessel_shape_whole_slices']} s, "
        f"identical output: {out['vessel_identical_to_whole_slices']}",
        flush=True,
    )
    return out


# ----------------------------------------------------------------------------------------- training
TRAINER_SOURCE = '''"""Benchmark-only schedule (benchmarks/bench_labelprop.py)."""
from nnunet_ext.trainers.nnUNetTrainerLabelPropB import nnUNetTrainerLabelPropB


class nnUNetTrainerLabelPropBench(nnUNetTrainerLabelPropB):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import torch
        super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cuda"))
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iterations}
        self.num_val_iterations_per_epoch = 2
        self.save_every = {epochs}
'''
TRAINER = "nnUNetTrainerLabelPropBench"


def write_trainer(workdir: Path, args) -> None:
    folder = workdir / "trainers"
    folder.mkdir(exist_ok=True)
    (folder / "nnunet_ext_labelprop_bench.py").write_text(
        TRAINER_SOURCE.format(epochs=args.epochs, iterations=args.iterations)
    )
    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    os.environ["nnUNet_extTrainer"] = ext_trainer_env()["nnUNet_extTrainer"] + os.pathsep + str(folder)


def predict_dice(dataset_id: int, src: Path, workdir: Path) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ext.core.datasets import existing_datasets_with_id

    name = existing_datasets_with_id(workdir / "nnUNet_raw", dataset_id)[0].name
    model = workdir / "nnUNet_results" / name / f"{TRAINER}__nnUNetPlans__3d_tiny"
    out = workdir / "predictions" / name
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(src / "imagesTs"), str(out), False, True, None)
    pairs = [(read(f), read(out / f.name)) for f in sorted((src / "labelsTs").glob("*.nii.gz"))]
    return dice_table(pairs)


def train_direct(dataset_id: int, args, log) -> None:
    from nnunet_ext.labelprop.run import RecipeOptions, _preprocess, _train

    opts = RecipeOptions(source="", out_id=dataset_id, configuration="3d_tiny", folds=("0",), num_processes=2)
    pre = Path(os.environ["nnUNet_preprocessed"])
    if not list(pre.glob(f"Dataset{dataset_id}_*/nnUNetPlans.json")):
        _preprocess(dataset_id, opts, log)
    model = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{dataset_id}_*")).name
    done = (
        Path(os.environ["nnUNet_results"])
        / model
        / f"{TRAINER}__nnUNetPlans__3d_tiny/fold_0/checkpoint_final.pth"
    )
    if not done.is_file():
        _train({"dataset": dataset_id, "fold": "0", "trainer": TRAINER}, opts, "cpu", False, log)


def bench_train(workdir: Path, args) -> dict:
    from nnunet_ext.labelprop.run import RecipeOptions, run_recipe
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    write_trainer(workdir, args)
    os.environ["nnUNet_n_proc_DA"] = "0"

    def log(msg):
        print(f"[bench] {msg}", flush=True)

    results, timings = {}, {}
    if not list((workdir / "nnUNet_raw").glob(f"Dataset{FULL_ID}_*")):
        write_phantom_dataset(
            workdir / "nnUNet_raw",
            FULL_ID,
            kind="full",
            name="BenchFull",
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
        )
    for every in args.every:
        src = sparse_dataset(workdir, every, args)
        sid = SPARSE_IDS[every]
        t0 = time.time()
        train_direct(sid, args, log)
        timings[f"every{every}/ignore"] = time.time() - t0
        results[f"every{every}/a_ignore_label"] = predict_dice(sid, src, workdir)
        log(f"every {every} (a) ignore label: {results[f'every{every}/a_ignore_label']}")
        for k, method in ((1, "nearest"), (3, "shape")):
            opts = RecipeOptions(
                source=str(src),
                out_id=sid + k,
                method=method,
                configuration="3d_tiny",
                trainer_a=TRAINER,
                trainer_b=TRAINER,
                folds=("0",),
                device="cpu",
                tta=False,
                qc_cases=1,
            )
            t0 = time.time()
            run_recipe(opts, workdir / f"state_{sid + k}.json", log=log)
            timings[f"every{every}/{method}"] = time.time() - t0
            key = f"every{every}/{'b' if method == 'nearest' else 'c'}_{method}_1round"
            results[key] = predict_dice(sid + k + 1, src, workdir)
            results[key.replace("_1round", "_modelA")] = predict_dice(sid + k, src, workdir)
            log(f"every {every} {method}: A {results[key.replace('_1round', '_modelA')]}, B {results[key]}")
    t0 = time.time()
    train_direct(FULL_ID, args, log)
    timings["full"] = time.time() - t0
    full = next((workdir / "nnUNet_raw").glob(f"Dataset{FULL_ID}_*"))
    results["d_fully_supervised"] = predict_dice(FULL_ID, full, workdir)
    log(f"(d) fully supervised: {results['d_fully_supervised']}")
    return {"dice": results, "seconds": {k: round(v) for k, v in timings.items()}}


def table(rows: dict) -> str:
    head = "| setting | " + " | ".join(FG) + " | mean |\n|---|" + "---|" * (len(FG) + 1)
    lines = [head]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in [*FG, "mean"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="benchmark_labelprop")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["interp", "parcellation", "speed"],
        choices=["interp", "parcellation", "speed", "train"],
    )
    parser.add_argument("--every", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parc-cases", type=int, default=8, help="parcellation cases (default 8)")
    parser.add_argument("--parc-labels", type=int, default=24, help="regions per parcellation (default 24)")
    parser.add_argument(
        "--parc-shape", type=int, nargs=3, default=[48, 96, 96], help="z y x (default 48 96 96)"
    )
    parser.add_argument(
        "--parc-spacing", type=float, nargs=3, default=[2.0, 1.0, 1.0], help="mm (default 2 1 1)"
    )
    parser.add_argument("--parc-warp", type=float, default=6.0, help="warp amplitude in mm (default 6)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=25)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    setup_env(workdir)
    result_file = workdir / "bench_labelprop.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    results["machine"] = machine()
    print(f"machine: {results['machine']}", flush=True)
    if "interp" in args.parts:
        results["interp"] = bench_interp(workdir, args)
        atomic_write_json(result_file, results)
        print(table(results["interp"]))
    if "parcellation" in args.parts:
        key = f"parcellation/{args.parc_labels}labels"
        results[key] = bench_parcellation(args)
        atomic_write_json(result_file, results)
    if "speed" in args.parts:
        results["speed"] = bench_speed(args)
        atomic_write_json(result_file, results)
    if "train" in args.parts:
        results["train"] = bench_train(workdir, args)
        results["train"]["schedule"] = {"epochs": args.epochs, "iterations_per_epoch": args.iterations}
        atomic_write_json(result_file, results)
        print(table(results["train"]["dice"]))
    print(f"results: {result_file}")


if __name__ == "__main__":
    sys.exit(main())
