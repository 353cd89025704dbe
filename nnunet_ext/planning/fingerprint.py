"""``nnunet-ext fingerprint``: nnU-Net's dataset fingerprint with the ignore label left out of the foreground
intensity statistics.

nnU-Net 2.8's ``DatasetFingerprintExtractor`` takes every voxel with ``label > 0`` as foreground, the ignore
label included (nnU-Net issue #3055, fix proposed in pull request #3068, not released). On sparse slice
annotations the ignore label covers whole slices (air, bone, fat), so the statistics CT normalisation uses
(clip to the 0.5-99.5 percentiles, then subtract the mean and divide by the std) come mostly from unannotated
tissue: on our sparse CT phantom the foreground mean is -558 HU (median -972, air) instead of ~100 HU and the
clip window is [-1028, 373] HU instead of [21, 234]. ZScore-normalised modalities (MRI) do not use these
statistics.

:func:`exclude_ignore_from_fingerprint` recomputes ``foreground_intensity_properties_per_channel`` the way
nnU-Net does (its own ``crop_to_nonzero`` and ``collect_foreground_intensities``, the same per-case sample
size and seed) with the ignore voxels treated as unlabelled, and rewrites ``dataset_fingerprint.json`` (the
old file is backed up). Plan after it: ``nnUNetv2_plan_and_preprocess`` without ``--clean`` (or
``nnUNetv2_plan_experiment``) reuses the existing fingerprint. ``nnunet-ext labelprop run`` does this itself.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import read_json
from nnunet_ext.core.nnunet_commands import count_arg

FINGERPRINT = "dataset_fingerprint.json"
KEY = "foreground_intensity_properties_per_channel"
MARK = "nnunet_ext_ignore_label_excluded"
FOREGROUND_SAMPLES = (
    10e7  # DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats (whole dataset)
)


def ignore_label_of(dataset_json: dict) -> int | None:
    """The dataset's ignore label as nnU-Net's LabelManager reads it (None without one)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order")).ignore_label


def _case_intensities(args) -> list:
    """Foreground intensity samples per channel of one case, ignore voxels excluded (nnU-Net's own helpers)."""
    image_files, label_file, reader_class, num_samples, ignore = args
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rw = reader_class()
    images, _ = rw.read_images(image_files)
    seg, _ = rw.read_seg(label_file)
    data, seg, _ = crop_to_nonzero(images, seg)
    seg = np.where(seg == ignore, 0, seg)
    samples, _ = DatasetFingerprintExtractor.collect_foreground_intensities(
        seg, data, num_samples=num_samples
    )
    return samples


def foreground_intensity_properties(raw_folder: Path, dataset_json: dict, num_processes: int = 2) -> dict:
    """``foreground_intensity_properties_per_channel`` of the raw dataset as nnU-Net computes it, except that
    voxels of the ignore label do not count as foreground."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    ignore = ignore_label_of(dataset_json)
    cases = get_filenames_of_train_images_and_targets(str(raw_folder), dataset_json)
    if not cases:
        raise UserError(f"{raw_folder} has no training cases.")
    first = next(iter(cases.values()))["images"][0]
    reader = determine_reader_writer_from_dataset_json(dataset_json, first)
    per_case = int(FOREGROUND_SAMPLES // len(cases))
    jobs = [(c["images"], c["label"], reader, per_case, ignore) for c in cases.values()]
    with ProcessPoolExecutor(max_workers=max(1, num_processes)) as pool:
        results = list(pool.map(_case_intensities, jobs))
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    out = {}
    for i in range(num_channels):
        values = np.concatenate([np.asarray(r[i], dtype=np.float64) for r in results])
        if values.size == 0:
            raise UserError(
                f"{raw_folder}: no training case has a voxel labelled with a class (not background, not ignore); "
                "nnU-Net's CT normalisation needs some. Check the labels."
            )
        p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        out[str(i)] = {
            "mean": float(values.mean()),
            "median": float(median),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "percentile_99_5": float(p995),
            "percentile_00_5": float(p005),
        }
    return out


def exclude_ignore_from_fingerprint(
    dataset: str | int, num_processes: int = 2, extract: bool = True, log=print
):
    """Rewrite the dataset's ``dataset_fingerprint.json`` with ignore-free foreground intensity statistics.

    Extracts the fingerprint first with ``nnUNetv2_extract_fingerprint`` when there is none (``extract``).
    Returns the fingerprint path, or None when the dataset has no ignore label (nothing to do)."""
    from nnunet_ext.core.paths import require_folder_var, resolve_dataset

    raw = resolve_dataset(dataset, "nnUNet_raw")
    dataset_json = read_json(raw / "dataset.json", "the dataset's", "fix the dataset's dataset.json")
    if ignore_label_of(dataset_json) is None:
        log(f"{raw.name} has no ignore label: nnU-Net's fingerprint is already right, nothing to do.")
        return None
    target = require_folder_var("nnUNet_preprocessed") / raw.name / FINGERPRINT
    if not target.is_file():
        if not extract:
            raise UserError(
                f"{target} does not exist. Run `nnUNetv2_extract_fingerprint -d {dataset}` first."
            )
        from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

        from nnunet_ext.core.nnunet_commands import nnunet_command

        cmd = [
            nnunet_command("nnUNetv2_extract_fingerprint"),
            "-d",
            str(convert_dataset_name_to_id(raw.name)),
            "-np",
            str(num_processes),
        ]
        log(f"$ {' '.join(cmd)}")
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"`{' '.join(cmd)}` failed; see its output above.")
    fingerprint = read_json(
        target, "the fingerprint", "delete it and rerun (nnUNetv2_extract_fingerprint writes it again)"
    )
    if fingerprint.get(MARK):
        log(f"{target} already excludes the ignore label.")
        return target
    old = fingerprint[KEY]
    fingerprint[KEY] = foreground_intensity_properties(raw, dataset_json, num_processes)
    fingerprint[MARK] = True
    backup = target.with_name(FINGERPRINT.replace(".json", ".with_ignore.json"))
    if not backup.exists():
        shutil.copy2(target, backup)
    from nnunet_ext.core.io import atomic_write_json

    atomic_write_json(target, fingerprint)
    for ch, new in fingerprint[KEY].items():
        before = old.get(ch, {})  # JSON: channel keys are strings in both
        log(
            f"channel {ch}: foreground mean {before.get('mean', float('nan')):.1f} -> {new['mean']:.1f}, clip window "
            f"[{before.get('percentile_00_5', float('nan')):.1f}, {before.get('percentile_99_5', float('nan')):.1f}]"
            f" -> [{new['percentile_00_5']:.1f}, {new['percentile_99_5']:.1f}]"
        )
    log(f"wrote {target} (the previous one: {backup.name})")
    plans = sorted(target.parent.glob("*Plans*.json"))
    if plans:
        log(
            "plans made from the old fingerprint still hold the old statistics: "
            + ", ".join(p.name for p in plans)
            + f". Plan again (nnUNetv2_plan_experiment -d {dataset}, then preprocess) to use the new ones."
        )
    return target


def _cmd(args) -> int:
    exclude_ignore_from_fingerprint(args.d, args.np, extract=not args.no_extract)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "fingerprint",
        help="nnU-Net's dataset fingerprint without the ignore label in the foreground intensity statistics",
        description="Recompute the foreground intensity statistics of nnU-Net's dataset_fingerprint.json with "
        "the ignore label left out (nnU-Net 2.8 counts ignore voxels as foreground, which skews CT "
        "normalisation on sparse annotations). Extracts the fingerprint first if there is none; backs the old "
        "one up. Then plan as usual: nnUNetv2_plan_and_preprocess -d ID (without --clean) reuses it.",
    )
    p.add_argument("-d", required=True, help="dataset id or name (nnUNet_raw)")
    p.add_argument("-np", type=count_arg(1), default=2, help="processes (default 2)")
    p.add_argument(
        "--no-extract", action="store_true", help="fail instead of running nnUNetv2_extract_fingerprint"
    )
    p.set_defaults(func=_cmd)
