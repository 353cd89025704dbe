"""``nnunet-ext submit NAME PRED_DIR OUT -d DATASET``: predictions in the file names, format and label values a
challenge's evaluation expects.

The test cases come from the converted dataset (``nnunet-ext convert``), whose dataset.json records every case
with its split and original name; every test case must have a prediction (``PRED_DIR/<case>.nii.gz``, as
``nnUNetv2_predict`` writes them) or nothing is written. ``OUT`` is written into a temporary folder and renamed
at the end; an existing ``OUT`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import META_KEY, Challenge, image_files, strip_suffix
from nnunet_ext.errors import UserError
from nnunet_ext.io import refuse_existing


def dataset_meta(challenge: Challenge, dataset: str | os.PathLike) -> dict:
    """``{"cases": {case id: {...}}}`` of the converted dataset, checked to belong to ``challenge``."""
    from nnunet_ext.tasks import resolve_dataset_folder

    folder = resolve_dataset_folder(str(dataset))
    dj_path = folder / "dataset.json"
    if not dj_path.is_file():
        raise UserError(f"{folder} has no dataset.json; pass the dataset written by `nnunet-ext convert`.")
    dj = json.loads(dj_path.read_text(encoding="utf-8"))
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
    meta = dataset_meta(challenge, dataset)
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
    refuse_existing(out, overwrite, "the submission folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = challenge.write_submission({cid: predictions[cid] for cid in expected}, meta, tmp)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
    p.add_argument("--overwrite", "-f", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_cmd)
    return p
