"""Quality-check figures of label propagation (``nnunet-ext labelprop qc``).

One PNG per case (matplotlib, Agg backend): the two views through the slice axis (e.g. coronal and sagittal
for axial annotations) with the labels overlaid and the annotated slice positions marked (solid lines), and a
row of slices along the axis: annotated, propagated (or pseudo-labelled) and, when present, a slice outside
the annotated range. The dataset must have been written by ``nnunet-ext labelprop interpolate`` or
``pseudo`` (it reads their ``labelprop.json``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import read_json
from nnunet_ext.core.progress import progress as progress_bar

__all__ = ["qc_case_figure", "qc_dataset"]

AXIS_LETTERS = "zyx"


def _overlay(
    ax, image: np.ndarray, labels: np.ndarray, ignore_label, aspect: float, title: str, origin: str = "lower"
) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, origin=origin)
    colours = colormaps["tab10"](np.arange(10))
    lab = labels.astype(np.int64)
    shown = np.ma.masked_where((lab == 0) | (lab == (ignore_label if ignore_label is not None else -1)), lab)
    ax.imshow(
        (shown - 1) % 10,
        cmap=ListedColormap(colours),
        vmin=0,
        vmax=9,
        alpha=0.45,
        aspect=aspect,
        origin=origin,
        interpolation="nearest",
    )
    if ignore_label is not None and np.any(lab == ignore_label):
        ign = np.ma.masked_where(lab != ignore_label, np.ones_like(lab))
        ax.imshow(ign, cmap=ListedColormap(["#7f7f7f"]), alpha=0.35, aspect=aspect, origin=origin)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def qc_case_figure(
    image: np.ndarray,
    labels: np.ndarray,
    annotated: Sequence[int],
    axis: int,
    spacing_zyx: Sequence[float],
    path: str | os.PathLike,
    *,
    ignore_label: int | None = None,
    title: str = "",
    kind: str = "propagated",
) -> Path:
    """Write one case's QC PNG (see the module docstring). Arrays are (z, y, x); ``annotated`` are the
    indices of the annotated slices along ``axis``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ann = sorted(int(a) for a in annotated)
    img = np.moveaxis(image.astype(np.float32), axis, 0)
    lab = np.moveaxis(labels, axis, 0)
    sp = [spacing_zyx[axis]] + [spacing_zyx[i] for i in range(3) if i != axis]
    fg = (lab != 0) & (lab != (ignore_label if ignore_label is not None else -1))
    centre = [int(np.median(np.nonzero(fg)[i])) if fg.any() else lab.shape[i] // 2 for i in range(3)]
    others = [i for i in range(3) if i != axis]

    n = lab.shape[0]
    picks: list[tuple[int, str]] = []
    if ann:
        picks.append((ann[0], "annotated"))
        gaps = [(b - a, a, b) for a, b in zip(ann[:-1], ann[1:]) if b - a > 1]
        if gaps:
            _, a, b = max(gaps)
            picks.append(((a + b) // 2, kind))
            picks.append((a + max(1, (b - a) // 4), kind))
        if len(ann) > 1:
            picks.append((ann[len(ann) // 2], "annotated"))
        outside = [s for s in (ann[0] - 1, ann[-1] + 1) if 0 <= s < n]
        if outside:
            picks.append((outside[0], "outside range"))
    picks = list(dict.fromkeys(picks))[:5] or [(n // 2, "slice")]

    fig = plt.figure(figsize=(3.2 * max(3, len(picks)), 7.2), dpi=90)
    grid = fig.add_gridspec(2, max(3, len(picks)))
    for k, (view_axis, letter) in enumerate(
        (
            (1, f"{AXIS_LETTERS[others[0]]} = {centre[1]}"),
            (2, f"{AXIS_LETTERS[others[1]]} = {centre[2]}"),
        )
    ):
        ax = fig.add_subplot(grid[0, k])
        img2 = np.take(img, centre[view_axis], axis=view_axis)
        lab2 = np.take(lab, centre[view_axis], axis=view_axis)
        _overlay(ax, img2, lab2, ignore_label, sp[0] / sp[3 - view_axis], f"view through slices, {letter}")
        for a in ann:
            ax.axhline(a, color="lime", lw=0.6)
        if ann:
            ax.set_ylabel(f"{AXIS_LETTERS[axis]} (lines: annotated)", fontsize=7)
    ax = fig.add_subplot(grid[0, 2])
    ax.axis("off")
    ax.text(
        0,
        0.95,
        f"{title}\n{kind}; axis {AXIS_LETTERS[axis]}\nannotated slices ({len(ann)}):\n"
        + ", ".join(str(a) for a in ann[:40])
        + (" ..." if len(ann) > 40 else "")
        + "\n\ngreen lines: annotated slices\ngrey: ignore label",
        va="top",
        fontsize=8,
        wrap=True,
    )
    for k, (s, what) in enumerate(picks):
        ax = fig.add_subplot(grid[1, k])
        _overlay(
            ax, img[s], lab[s], ignore_label, sp[1] / sp[2], f"{what}: {AXIS_LETTERS[axis]} = {s}", "upper"
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def qc_dataset(
    dataset: str | os.PathLike,
    out_dir: str | os.PathLike,
    cases: Sequence[str] | None = None,
    max_cases: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """QC PNGs (``<out_dir>/<case>.png``) of a dataset written by ``labelprop interpolate`` / ``pseudo``."""
    import SimpleITK as sitk

    from nnunet_ext.labelprop.propagate import METADATA_FILE, _resolve_raw

    folder = _resolve_raw(dataset)
    meta_file = folder / METADATA_FILE
    if not meta_file.is_file():
        raise UserError(
            f"{folder.name} has no {METADATA_FILE}: it was not written by `nnunet-ext labelprop interpolate` "
            f"or `pseudo`. Pass such a dataset."
        )
    rewrite = "write the dataset again with `nnunet-ext labelprop interpolate` / `pseudo` (--force), or repair the file"
    meta = read_json(meta_file, "the label propagation record", rewrite)
    if not isinstance(meta.get("cases"), dict) or "axis" not in meta or "step" not in meta:
        raise UserError(
            f"the label propagation record {meta_file} lacks 'cases' / 'axis' / 'step'; {rewrite}."
        )
    dj = read_json(folder / "dataset.json", "the dataset's dataset.json", rewrite)
    if "file_ending" not in dj or not isinstance(dj.get("labels"), dict):
        raise UserError(
            f"the dataset's dataset.json {folder / 'dataset.json'} lacks 'file_ending' / 'labels'; {rewrite}."
        )
    ending = dj["file_ending"]
    all_cases = sorted(meta["cases"])
    chosen = list(cases) if cases else all_cases
    unknown = [c for c in chosen if c not in meta["cases"]]
    if unknown:
        raise UserError(
            f"cases not in {folder.name}: {', '.join(unknown)}. Available: {', '.join(all_cases[:10])}"
        )
    if max_cases is not None:
        chosen = chosen[:max_cases]
    kind = {"interpolate": f"propagated ({meta.get('method')})", "pseudo": "pseudo-label"}.get(
        meta["step"], ""
    )
    iterator = progress_bar(chosen, f"qc {folder.name}", progress)
    written = []
    for case in iterator:
        lab_img = sitk.ReadImage(str(folder / "labelsTr" / f"{case}{ending}"))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000{ending}")))
        written.append(
            qc_case_figure(
                image,
                sitk.GetArrayFromImage(lab_img),
                meta["cases"][case]["annotated"],
                int(meta["axis"]),
                tuple(reversed(lab_img.GetSpacing())),
                Path(out_dir) / f"{case}.png",
                ignore_label=dj["labels"].get("ignore"),
                title=f"{folder.name} / {case}",
                kind=kind,
            )
        )
    return written


def _cmd_qc(args) -> int:
    from nnunet_ext.labelprop.propagate import _resolve_raw

    out = Path(args.output) if args.output else Path("labelprop_qc") / _resolve_raw(args.dataset).name
    paths = qc_dataset(args.dataset, out, args.cases, args.max_cases, progress=not args.quiet)
    print(f"wrote {len(paths)} figure(s) to {out}")
    return 0


def add_qc_parser(sub) -> None:
    p = sub.add_parser(
        "qc",
        help="quality-check PNGs per case: annotated slice positions, propagated slices, pseudo-labels",
        description="Write one PNG per case of a dataset written by `labelprop interpolate` or `pseudo`: views "
        "through the slice axis with the annotated slices marked, and annotated / propagated slices.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset id, name under nnUNet_raw, or folder")
    p.add_argument("-o", "--output", default=None, help="output folder (default ./labelprop_qc/<dataset>)")
    p.add_argument("--cases", nargs="+", default=None, help="only these cases")
    p.add_argument("--max-cases", type=int, default=None, help="at most N cases")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_qc)
