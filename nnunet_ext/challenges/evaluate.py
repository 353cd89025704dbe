"""``nnunet-ext evaluate PRED_DIR GT_DIR --challenge NAME``: a challenge's metrics per case and class.

Classes, official metrics, tolerances and the conventions for empty masks and spacing come from the challenge
definition (:mod:`nnunet_ext.challenges`); surface distances from MONAI (:mod:`nnunet_ext.core.metrics`).
Output: ``<challenge>_metrics.json`` (per case, per class, means, the conventions used) and
``<challenge>_metrics.csv`` (one row per case and class, plus the mean rows), and a summary table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import (
    ALL_METRICS,
    Challenge,
    bad_label_values,
    image_files,
    read_label_pair,
    strip_suffix,
)
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import atomic_write_json, atomic_write_text, refuse_existing
from nnunet_ext.core.progress import progress as progress_bar


def evaluate_case(
    challenge: Challenge,
    case_id: str,
    pred_path: Path,
    gt_path: Path,
    metrics: tuple[str, ...],
    tolerance: float | None = None,
) -> dict[str, dict[str, float]]:
    """Read one prediction / reference pair, check that they share a grid, and score it with the
    challenge's own pipeline (:meth:`Challenge.score_case`)."""
    pred_vol, gt_vol = read_label_pair(pred_path, gt_path)
    if pred_vol.array.shape != gt_vol.array.shape:
        raise UserError(
            f"{case_id}: prediction shape {pred_vol.array.shape} differs from the reference's "
            f"{gt_vol.array.shape}; predict the same images the reference belongs to."
        )
    if not np.allclose(pred_vol.spacing, gt_vol.spacing, rtol=1e-4, atol=1e-4):
        raise UserError(
            f"{case_id}: prediction spacing {pred_vol.spacing} (z, y, x) differs from the reference's "
            f"{gt_vol.spacing}; predictions must be in the reference's geometry."
        )
    allowed = challenge.allowed_label_values()
    ignore = {challenge.rules.ignore_label} - {None}  # references may mark unannotated voxels (COSMOS22)
    for what, volume, values, fix in (
        ("prediction", pred_vol, allowed, "predict with a model trained on the converted dataset"),
        (
            "reference",
            gt_vol,
            allowed | ignore,
            "pass this challenge's reference labels (the converted dataset's)",
        ),
    ):
        bad = bad_label_values(volume.array, values)
        if bad:
            raise UserError(
                f"{case_id}: the {what} holds label values {bad} that {challenge.title} does not define "
                f"({challenge.labels}); {fix}, or evaluate with the --challenge the labels belong to."
            )
    return challenge.score_case(pred_vol, gt_vol, case_id, metrics, tolerance)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return float(np.mean(finite))


def evaluate_folders(
    challenge: Challenge | str,
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    metrics: list[str] | None = None,
    tolerance: float | None = None,
    progress: bool = False,
    only_predicted: bool = False,
) -> dict:
    """Score every reference file of ``gt_dir`` against the file of the same name in ``pred_dir``
    (``only_predicted``: only the references that have a prediction, e.g. one fold's validation cases)."""
    challenge = get_challenge(challenge) if isinstance(challenge, str) else challenge
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, d in (("prediction", pred_dir), ("reference", gt_dir)):
        if not d.is_dir():
            raise UserError(f"{what} folder {d} does not exist.")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance must be a distance in mm >= 0, got {tolerance}.")
    metrics = tuple(metrics or challenge.rules.metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise UserError(f"unknown metrics {unknown}; choose from {', '.join(ALL_METRICS)}.")
    gts = {strip_suffix(p.name): p for p in image_files(gt_dir)}
    preds = {strip_suffix(p.name): p for p in image_files(pred_dir)}
    if not gts:
        raise UserError(f"no reference images (.nii.gz, .nii, .mha, .nrrd) in {gt_dir}.")
    missing = sorted(set(gts) - set(preds))
    if only_predicted:
        gts = {k: v for k, v in gts.items() if k in preds}
        if not gts:
            raise UserError(f"no prediction in {pred_dir} has a reference of the same name in {gt_dir}.")
    elif missing:
        raise UserError(
            f"{len(missing)} reference cases have no prediction in {pred_dir}: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; predict them (same file names as the references), or pass "
            f"--only-predicted to score only the predicted cases."
        )
    eval_classes = {cls.name: cls for case_id in gts for cls in challenge.eval_classes(case_id)}.values()
    if "NSD" in metrics and any(challenge.tolerance_for(cls, tolerance) is None for cls in eval_classes):
        raise UserError(f"NSD needs a tolerance for {challenge.name}; pass --tolerance MM.")
    cases = {}
    items = progress_bar(sorted(gts.items()), f"evaluate {challenge.name}", progress)
    for case_id, gt_path in items:
        cases[case_id] = evaluate_case(challenge, case_id, preds[case_id], gt_path, metrics, tolerance)
    classes: list[str] = []
    for per_class in cases.values():
        classes += [c for c in per_class if c not in classes]
    mean = {
        cls: {m: _mean([r[cls][m] for r in cases.values() if cls in r]) for m in metrics} for cls in classes
    }
    tolerances = {cls.name: challenge.tolerance_for(cls, tolerance) for cls in eval_classes}
    return {
        "challenge": challenge.name,
        "prediction_folder": str(pred_dir.resolve()),
        "reference_folder": str(gt_dir.resolve()),
        "metrics": list(metrics),
        "conventions": {
            **challenge.rules.to_json(),
            "nsd_tolerance_mm": tolerances if "NSD" in metrics else None,
            "distances_in": "voxels" if challenge.rules.unit_spacing else "mm",
            "library": "MONAI surface distances (monai.metrics.utils.get_edge_surface_distance)",
        },
        "mean": mean,
        "overall_mean": {m: _mean([mean[c][m] for c in classes]) for m in metrics},
        "cases": cases,
        "unmatched_predictions": sorted(set(preds) - set(gts)),
        "references_without_prediction": missing if only_predicted else [],
    }


def _json_value(v):
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def to_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    metrics = results["metrics"]
    w.writerow(["case", "class", *metrics])
    for case_id, per_class in results["cases"].items():
        for cls, values in per_class.items():
            w.writerow([case_id, cls, *(repr(float(values[m])) for m in metrics)])
    for cls, values in results["mean"].items():
        w.writerow(["mean", cls, *(repr(float(values[m])) for m in metrics)])
    return buf.getvalue()


def format_summary(results: dict) -> str:
    metrics = results["metrics"]
    rows = [["class", *metrics]]
    for cls, values in results["mean"].items():
        rows.append([cls, *(f"{values[m]:.4f}" for m in metrics)])
    rows.append(["mean", *(f"{results['overall_mean'][m]:.4f}" for m in metrics)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    n = len(results["cases"])
    head = f"{results['challenge']}: mean over {n} case{'s' if n != 1 else ''} (NaN cases left out)"
    return "\n".join([head, *lines])


def write_results(results: dict, out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    stem = f"{results['challenge']}_metrics"
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    for p in (json_path, csv_path):
        refuse_existing(p, overwrite, "the metrics file", "--overwrite")
    atomic_write_json(json_path, _json_value(results))
    atomic_write_text(csv_path, to_csv(results))
    return json_path, csv_path


def _cmd(args: argparse.Namespace) -> int:
    challenge = get_challenge(args.challenge)
    results = evaluate_folders(
        challenge, args.pred_dir, args.gt_dir, args.metrics, args.tolerance, not args.quiet
    )
    json_path, csv_path = write_results(results, args.output or args.pred_dir, args.overwrite)
    print(format_summary(results))
    for note in challenge.rules.notes:
        print(f"note: {note}")
    if results["unmatched_predictions"]:
        print(f"ignored {len(results['unmatched_predictions'])} predictions without reference")
    if results["references_without_prediction"]:
        print(f"left out {len(results['references_without_prediction'])} references without prediction")
    print(f"wrote {json_path} and {csv_path}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    from nnunet_ext.challenges import CHALLENGES

    text = "a challenge's official metrics (Dice, HD95, HD, average distance, NSD, ...) per case and class"
    by_text: dict[str, list[str]] = {}  # challenges sharing rules (the AMOS22 tasks) are listed together
    for name, challenge in CHALLENGES.items():
        for a in challenge.rules.assumed:
            by_text.setdefault(a, []).append(name)
    assumed = [f"  {', '.join(names)}: {a}" for a, names in by_text.items()]
    epilog = (
        "values we assume where no official definition was found:\n" + "\n".join(assumed) if assumed else None
    )
    p = sub.add_parser(
        "evaluate",
        help=text,
        description=text + " (see docs/challenges/).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", help="predicted label files")
    p.add_argument("gt_dir", metavar="GT_DIR", help="reference label files (same names)")
    p.add_argument("--challenge", required=True, help="challenge whose classes and conventions to use")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help=f"instead of the official ones; any of {', '.join(ALL_METRICS)}",
    )
    p.add_argument(
        "--only-predicted", action="store_true", help="score only the references that have a prediction"
    )
    p.add_argument("--tolerance", type=float, default=None, help="NSD tolerance in mm for every class")
    p.add_argument("-o", "--output", default=None, help="folder for the JSON and CSV (default PRED_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace existing metrics files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
    return p
