"""``nnunet-ext submit NAME PRED_DIR OUT -d DATASET``: predictions in the file names, format and label values a
challenge's evaluation expects.

The test cases come from the converted dataset (``nnunet-ext convert``), whose dataset.json records every case
with its split and original name; every test case must have a prediction (``PRED_DIR/<case>.nii.gz``, as
``nnUNetv2_predict`` writes them) or nothing is written. ``OUT`` is written into a temporary folder and renamed
at the end; an existing ``OUT`` is refused unless ``--overwrite``, and even then only replaced if it is a
submission this command wrote (it holds the marker file ``.nnunet_ext_submission``) or an empty folder. ``OUT``
may never be, contain or lie inside the prediction folder, the converted dataset, nnU-Net's raw /
preprocessed / results folders themselves or any ``DatasetXXX_*`` folder inside them.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import IMAGE_SUFFIXES, META_KEY, Challenge, image_files, strip_suffix
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import make_temp_dir, read_json, refuse_existing

MARKER = ".nnunet_ext_submission"  # written into every submission folder: --overwrite replaces only these


def dataset_meta(challenge: Challenge, folder: Path) -> dict:
    """``{"cases": {case id: {...}}}`` of the converted dataset ``folder``, checked to belong to ``challenge``."""
    dj_path = folder / "dataset.json"
    if not dj_path.is_file():
        raise UserError(f"{folder} has no dataset.json; pass the dataset written by `nnunet-ext convert`.")
    dj = read_json(dj_path, "the dataset's dataset.json", "convert the challenge's data again")
    if hasattr(challenge, "submission_meta"):
        return challenge.submission_meta(folder, dj)
    meta = dj.get(META_KEY)
    if not meta:
        raise UserError(
            f"{folder} was not written by `nnunet-ext convert` (no {META_KEY} in dataset.json); convert the "
            f"challenge's data with `nnunet-ext convert {challenge.name} SOURCE --id N` and predict its imagesTs."
        )
    if meta.get("challenge") != challenge.name:
        raise UserError(f"{folder} is a converted {meta.get('challenge')} dataset, not {challenge.name}.")
    return meta


def image_geometries(*paths: Path) -> list[tuple[tuple[int, ...], tuple[float, ...]]] | None:
    """``(shape, spacing)`` (z, y, x) of each file from its header, all with the same reader: SimpleITK, or nibabel
    for all when SimpleITK refuses one (AMOS's sheared files); None if neither reads them all (the reading itself
    reports that later)."""
    import SimpleITK as sitk

    try:
        out = []
        for path in paths:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            out.append(
                (
                    tuple(reversed(reader.GetSize()))[-3:],
                    tuple(float(x) for x in reversed(reader.GetSpacing()))[-3:],
                )
            )
        return out
    except RuntimeError:
        pass
    try:
        import nibabel

        headers = [nibabel.load(str(path)).header for path in paths]
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader that needs it
        return None
    return [
        (
            tuple(int(n) for n in reversed(h.get_data_shape()[:3])),
            tuple(float(z) for z in reversed(h.get_zooms()[:3])),
        )
        for h in headers
    ]


def check_prediction_geometry(case_id: str, prediction: Path, dataset_folder: Path) -> None:
    """Refuse a prediction whose shape or spacing is not its converted test image's (imagesTs/<case>_0000.*):
    the submission would keep the prediction's geometry and miss the challenge's reference."""
    images = [dataset_folder / "imagesTs" / f"{case_id}_0000{suffix}" for suffix in IMAGE_SUFFIXES]
    image = next((i for i in images if i.is_file()), None)
    if image is None:
        return
    geometries = image_geometries(prediction, image)
    if geometries is None:
        return
    mine, theirs = geometries
    import numpy as np

    if mine[0] != theirs[0] or not np.allclose(mine[1], theirs[1], rtol=1e-4, atol=1e-4):
        raise UserError(
            f"{case_id}: prediction {prediction} has shape {mine[0]} and spacing {mine[1]} (z, y, x), its test "
            f"image {image.name} {theirs[0]} and {theirs[1]}; predict the converted dataset's imagesTs with "
            f"nnUNetv2_predict, which writes each prediction in its image's geometry."
        )


def check_out_folder(out: Path, pred_dir: Path, dataset_folder: Path) -> None:
    """Refuse an ``OUT`` whose replacement could destroy data: the prediction folder or the converted dataset
    (or a folder holding either, or inside either), nnU-Net's own folders, or a dataset folder inside them."""
    target = out.resolve()
    protected = {
        pred_dir.resolve(): "the prediction folder",
        dataset_folder.resolve(): "the converted dataset",
    }
    roots = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if os.environ.get(var):
            roots[Path(os.environ[var]).resolve()] = f"${var}"
    for folder, what in {**protected, **roots}.items():
        if target == folder or folder.is_relative_to(target):
            raise UserError(
                f"OUT {out} is or contains {what} ({folder}); replacing it would delete data. Choose a new, "
                f"separate folder for the submission."
            )
    for folder, what in protected.items():
        if target.is_relative_to(folder):
            raise UserError(f"OUT {out} lies inside {what} ({folder}); choose a folder outside it.")
    for root, what in roots.items():
        if target.is_relative_to(root) and target.relative_to(root).parts[0].startswith("Dataset"):
            raise UserError(
                f"OUT {out} lies inside an nnU-Net dataset folder of {what}; choose a folder outside "
                f"{root}/DatasetXXX_*."
            )


def submit(
    challenge: Challenge | str,
    pred_dir: str | os.PathLike,
    out: str | os.PathLike,
    dataset: str | os.PathLike,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Write the submission folder ``out``; return it and the file names written."""
    challenge = get_challenge(challenge) if isinstance(challenge, str) else challenge
    pred_dir, out = Path(pred_dir), Path(out)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} does not exist.")
    from nnunet_ext.core.paths import resolve_dataset_folder

    folder = resolve_dataset_folder(str(dataset))
    meta = dataset_meta(challenge, folder)
    expected = sorted(cid for cid, m in meta["cases"].items() if m.get("split") == "Ts")
    if not expected:
        raise UserError(
            f"the dataset {dataset} has no test cases (imagesTs); a submission needs the challenge's test images "
            f"converted too."
        )
    predictions = {strip_suffix(p.name): p for p in image_files(pred_dir)}
    missing = [cid for cid in expected if cid not in predictions]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(expected)} test cases have no prediction in {pred_dir}: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. Predict the converted dataset's imagesTs, e.g. "
            f"nnUNetv2_predict -i $nnUNet_raw/DatasetXXX/imagesTs -o {pred_dir} ..."
        )
    for cid in expected:
        check_prediction_geometry(cid, predictions[cid], folder)
    check_out_folder(out, pred_dir, folder)
    refuse_existing(out, overwrite, "the submission folder", "--overwrite")
    if out.exists() and not (out.is_dir() and ((out / MARKER).is_file() or not any(out.iterdir()))):
        raise UserError(
            f"{out} exists and is not a submission written by `nnunet-ext submit` (no {MARKER} in it), so "
            f"--overwrite does not replace it; choose a new OUT folder."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        written = challenge.write_submission({cid: predictions[cid] for cid in expected}, meta, tmp)
        (tmp / MARKER).write_text(f"written by nnunet-ext submit {challenge.name}\n", encoding="utf-8")
        if out.exists():
            aside = make_temp_dir(f".{out.name}.old-", out.parent)
            os.replace(out, aside / out.name)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, written


def _cmd(args: argparse.Namespace) -> int:
    challenge = get_challenge(args.challenge)
    out, written = submit(challenge, args.pred_dir, args.out, args.dataset, args.overwrite)
    print(f"{challenge.title}: wrote {len(written)} files ({challenge.submission_format}) -> {out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    text = "write predictions as a challenge's evaluation expects them (names, format, label values)"
    p = sub.add_parser("submit", help=text, description=text + "; checks that every test case is present.")
    p.add_argument("challenge", metavar="NAME", help="challenge (nnunet-ext convert --list)")
    p.add_argument("pred_dir", metavar="PRED_DIR", help="nnUNetv2_predict output for the converted imagesTs")
    p.add_argument("out", metavar="OUT", help="submission folder to write")
    p.add_argument("-d", "--dataset", required=True, help="the converted dataset (id, name or folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_cmd)
    return p
