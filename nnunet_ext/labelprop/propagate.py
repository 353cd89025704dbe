"""Label propagation: training nnU-Net from sparse slice annotations (COSMOS22 1st place recipe).

``nnunet-ext labelprop {interpolate,pseudo,run,qc}``; see docs/labelprop.md.

* :func:`interpolate_volume` fills the unannotated slices between the first and the last annotated slice of
  one label volume: ``nearest`` (copy the nearest annotated slice, ties to the lower one, as the COSMOS
  entry did) or ``shape`` (per-label signed distance maps, linear in the slice index between the two
  bracketing annotated slices, labels kept exclusive by taking the smallest interpolated distance).
* :func:`interpolate_dataset` applies it to a whole nnU-Net raw dataset and writes a NEW dataset.
* :func:`pseudo_label_dataset` predicts the training scans with a trained model (an ensemble of folds,
  nnU-Net's ``nnUNetPredictor``), writes the annotated slices back over the predictions and writes the
  next-round dataset.
* :mod:`nnunet_ext.labelprop.run` chains everything with the stock nnU-Net commands (``labelprop run``),
  :mod:`nnunet_ext.labelprop.qc` draws the quality-check figures (``labelprop qc``).

Bad input (cases without annotated slice, label values missing from dataset.json, annotated slices that hold
only the ignore label, image/label geometry mismatches, ...) is reported for ALL bad cases at once as a
:class:`~nnunet_ext.core.errors.UserError`; nothing is written then. Every dataset is written into a hidden
temporary folder beside the target and renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ext.core.datasets import RawDatasetWriter, existing_datasets_with_id
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import (
    read_json,
)
from nnunet_ext.core.nnunet_commands import device_arg
from nnunet_ext.core.progress import progress as progress_bar

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "OUTSIDE_CHOICES",
    "AXIS_NAMES",
    "METADATA_FILE",
    "SparseCase",
    "SparseDataset",
    "annotated_slices_of",
    "detect_axis",
    "interpolate_volume",
    "interpolate_nearest",
    "interpolate_shape",
    "load_sparse_dataset",
    "interpolate_dataset",
    "merge_annotations",
    "pseudo_label_dataset",
    "model_folder",
    "existing_datasets_with_id",
    "parse_axis",
]

METHODS = ("nearest", "shape")
# chosen from the interpolation-only benchmarks (docs/labelprop.md#benchmark, benchmarks/bench_labelprop.py):
# shape beats nearest on many adjacent irregular regions (parcellations) and ties on the organ phantom; the
# official COSMOS code copies the nearest slice (--method nearest)
DEFAULT_METHOD = "shape"
OUTSIDE_CHOICES = ("ignore", "background")
AXIS_NAMES = {"z": 0, "y": 1, "x": 2}
METADATA_FILE = "labelprop.json"
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


# =============================================================================== interpolation (numpy)
def parse_axis(axis: str | int | None) -> int | None:
    """``'z'|'y'|'x'`` or ``0|1|2`` (numpy axes of the (z, y, x) array) -> 0..2; None stays None."""
    if axis is None:
        return None
    text = str(axis).strip().lower()
    if text in AXIS_NAMES:
        return AXIS_NAMES[text]
    if text in ("0", "1", "2"):
        return int(text)
    raise UserError(f"--axis must be one of z, y, x (or 0, 1, 2: axes of the (z, y, x) array), got {axis!r}.")


def _check_annotated(annotated: Iterable[int], n: int) -> np.ndarray:
    ann = np.unique(np.asarray(list(annotated), dtype=np.int64))
    if ann.size == 0:
        raise ValueError("no annotated slice")
    if ann[0] < 0 or ann[-1] >= n:
        raise ValueError(f"annotated slice indices must be in 0..{n - 1}, got {ann.tolist()}")
    return ann


def interpolate_nearest(stack: np.ndarray, annotated: Sequence[int]) -> np.ndarray:
    """Fill slices ``annotated[0] .. annotated[-1]`` of ``stack`` (slice axis first) with the nearest annotated
    slice; a slice exactly halfway between two annotated slices copies the LOWER one. Returns a copy; slices
    outside the annotated range are returned unchanged."""
    ann = _check_annotated(annotated, stack.shape[0])
    out = stack.copy()
    for s in range(int(ann[0]), int(ann[-1]) + 1):
        j = int(np.searchsorted(ann, s))  # ann[j] >= s
        if ann[j] == s:
            continue
        lower, upper = ann[j - 1], ann[j]
        out[s] = stack[lower] if s - lower <= upper - s else stack[upper]
    return out


def _signed_distance(mask: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """2D signed distance (in the units of ``sampling``): negative inside, positive outside; the zero level
    lies halfway between the boundary voxels inside (-1 voxel) and outside (+1 voxel)."""
    if not mask.any() or mask.all():
        raise ValueError("signed distance of an empty or full mask is undefined")
    outside = _edt_near(~mask, sampling)
    inside = _edt_near(mask, sampling)
    return (outside - inside).astype(np.float32)


def _edt_near(mask: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """``distance_transform_edt(mask, sampling)``, computed inside the bounding box of ``mask`` grown by one
    voxel (zero outside it): every voxel outside the box is a zero of ``mask``, so the grown box's border holds
    a zero closer to any voxel in the box than any zero outside the box (project that zero onto the border:
    no coordinate moves further away, one comes closer). Same nearest zeros, same distances; a small label's
    inside distances no longer cost a whole slice."""
    from scipy.ndimage import distance_transform_edt

    box = _foreground_box(mask)
    if box is None:
        return np.zeros(mask.shape, np.float64)
    y0, y1 = max(0, box[0] - 1), min(mask.shape[0], box[1] + 1)
    x0, x1 = max(0, box[2] - 1), min(mask.shape[1], box[3] + 1)
    if (y0, y1, x0, x1) == (0, mask.shape[0], 0, mask.shape[1]):
        return distance_transform_edt(mask, sampling=sampling)
    out = np.zeros(mask.shape, np.float64)
    out[y0:y1, x0:x1] = distance_transform_edt(mask[y0:y1, x0:x1], sampling=sampling)
    return out


_FULL = "full"


def _slice_sdfs(sl: np.ndarray, labels: Sequence[int], sampling: Sequence[float]) -> dict:
    """Per label: its signed distance map on slice ``sl``, ``_FULL`` if it fills the whole slice, None if it is
    absent (both resolved against the other bracketing slice by :func:`_pair`)."""
    out: dict = {}
    for lab in labels:
        mask = sl == lab
        out[lab] = None if not mask.any() else _FULL if mask.all() else _signed_distance(mask, sampling)
    return out


def _pair(va, vb, half_diag: float) -> tuple:
    """The two end distances of one label for a gap. A label ABSENT on one slice gets ``d + 2 * depth`` there
    (``d``: its map on the other slice, ``depth``: its largest inside distance), a label FILLING one slice gets
    ``d - 2 * reach`` (``reach``: the largest outside distance): the structure then erodes (grows) uniformly
    and disappears (covers the slice) exactly halfway, where ``nearest`` switches too."""
    if isinstance(va, np.ndarray) and isinstance(vb, np.ndarray):
        return va, vb
    if isinstance(va, np.ndarray):
        return va, va + 2 * float(np.max(-va)) if vb is None else va - 2 * float(np.max(va))
    if isinstance(vb, np.ndarray):
        return (vb + 2 * float(np.max(-vb)) if va is None else vb - 2 * float(np.max(vb))), vb
    # no map on either slice: full on both (constant inside) or full on one and absent on the other
    value = {_FULL: -half_diag, None: half_diag}
    return value[va], value[vb]


# margin (voxels) around the labels of a gap's two end slices; >= 1 keeps the output identical to whole slices
SHAPE_MARGIN = 2


def _foreground_box(sl: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1): the bounding box of the non-background (non-zero) voxels of a 2D slice, None if empty."""
    rows = np.flatnonzero(sl.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(sl.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _box_union(a, b):
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def _crop(value, box, computed_on):
    """A slice's map (computed on the box ``computed_on``) restricted to ``box``; _FULL and None stay."""
    if not isinstance(value, np.ndarray):
        return value
    y, x = computed_on[0], computed_on[2]
    return value[box[0] - y : box[1] - y, box[2] - x : box[3] - x]


def interpolate_shape(
    stack: np.ndarray,
    annotated: Sequence[int],
    sampling: Sequence[float] = (1.0, 1.0),
    crop: bool = True,
) -> np.ndarray:
    """Shape-based interpolation of a label stack (slice axis first) between its annotated slices.

    For each gap between two consecutive annotated slices ``a < b`` and each label present on ``a`` or ``b``
    (background included), the in-plane signed distance maps (``scipy.ndimage.distance_transform_edt`` with
    the in-plane ``sampling``) are interpolated linearly in the slice index, ``(1 - t) * d_a + t * d_b`` with
    ``t = (s - a) / (b - a)``; each voxel takes the label with the SMALLEST interpolated distance, so labels
    stay mutually exclusive and every voxel gets exactly one label (ties: the lower label value). A label
    absent on (or filling) one of the two slices vanishes (covers the slice) halfway, see :func:`_pair`. Annotated
    slices are copied unchanged; slices outside the annotated range are returned unchanged.

    ``crop`` (default): each gap is computed inside the bounding box of both end slices' non-background labels
    grown by :data:`SHAPE_MARGIN` voxels, and background (0) outside it. The output is the same as on whole
    slices: outside the box both end slices are background, so background wins there; inside it every distance
    is exact, because the nearest voxel of any label (background included) lies inside the box or on its
    background border (tests/labelprop/test_labelprop.py compares ``crop=False``).
    """
    ann = _check_annotated(annotated, stack.shape[0])
    out = stack.copy()
    shape2d = stack.shape[1:]
    half_diag = 0.5 * float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape2d, sampling))))
    whole = (0, int(shape2d[0]), 0, int(shape2d[1]))
    gaps = [(int(a), int(b)) for a, b in zip(ann[:-1], ann[1:]) if b - a >= 2]
    # the box of each gap, and per end slice the box holding all its gaps' boxes (its maps are computed once)
    gap_box: dict[tuple[int, int], tuple | None] = {}
    slice_box: dict[int, tuple] = {}
    for a, b in gaps:
        if crop:
            box = _box_union(_foreground_box(stack[a]), _foreground_box(stack[b]))
            if box is not None:
                m = SHAPE_MARGIN
                box = (
                    max(0, box[0] - m),
                    min(whole[1], box[1] + m),
                    max(0, box[2] - m),
                    min(whole[3], box[3] + m),
                )
        else:
            box = whole
        gap_box[(a, b)] = box
        if box is not None:
            for s_ in (a, b):
                slice_box[s_] = _box_union(slice_box.get(s_), box)
    cache: dict[int, dict] = {}
    for a, b in gaps:
        box = gap_box[(a, b)]
        if box is None:  # background only on both end slices
            out[a + 1 : b] = 0
            continue
        for s_ in (a, b):
            if s_ not in cache:
                sb = slice_box[s_]
                sl = stack[s_, sb[0] : sb[1], sb[2] : sb[3]]
                cache[s_] = _slice_sdfs(sl, np.unique(sl).tolist(), sampling)
        labels = sorted(set(cache[a]) | set(cache[b]))
        pairs = [
            (
                lab,
                *_pair(
                    _crop(cache[a].get(lab), box, slice_box[a]),
                    _crop(cache[b].get(lab), box, slice_box[b]),
                    half_diag,
                ),
            )
            for lab in labels
        ]
        lab_values = np.asarray([p[0] for p in pairs], dtype=stack.dtype)
        box_shape = (box[1] - box[0], box[3] - box[2])
        for s in range(a + 1, b):
            t = (s - a) / (b - a)
            dist = np.stack(
                [
                    np.broadcast_to((1 - t) * np.asarray(va) + t * np.asarray(vb), box_shape)
                    for _, va, vb in pairs
                ]
            )
            out[s] = 0
            out[s, box[0] : box[1], box[2] : box[3]] = lab_values[np.argmin(dist, axis=0)]
        cache.pop(a, None)  # every slice is the lower end of one gap only
    return out


def interpolate_volume(
    labels: np.ndarray,
    annotated: Sequence[int],
    axis: int = 0,
    method: str = DEFAULT_METHOD,
    spacing: Sequence[float] | None = None,
    outside: str = "ignore",
    ignore_label: int | None = None,
) -> np.ndarray:
    """Propagate the annotated slices of a 3D label volume to the unannotated slices.

    ``annotated``: indices along ``axis`` of the annotated slices (their content is kept exactly). Slices
    between the first and the last annotated slice are filled with ``method`` (``'nearest'`` or ``'shape'``),
    slices outside that range get ``ignore_label`` (``outside='ignore'``) or background 0
    (``outside='background'``). ``spacing`` (per array axis, default 1) gives the in-plane sampling of
    the ``shape`` method's distance maps.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume, got shape {labels.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if outside not in OUTSIDE_CHOICES:
        raise ValueError(f"outside must be one of {OUTSIDE_CHOICES}, got {outside!r}")
    if outside == "ignore" and ignore_label is None:
        raise ValueError("outside='ignore' needs the ignore label value")
    spacing = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
    stack = np.moveaxis(labels, axis, 0)
    ann = _check_annotated(annotated, stack.shape[0])
    if method == "nearest":
        out = interpolate_nearest(stack, ann)
    else:
        in_plane = [spacing[i] for i in range(3) if i != axis]
        out = interpolate_shape(stack, ann, in_plane)
    fill = ignore_label if outside == "ignore" else 0
    out[: ann[0]] = fill
    out[ann[-1] + 1 :] = fill
    return np.moveaxis(out, 0, axis)


def annotated_slices_of(
    labels: np.ndarray, axis: int, ignore_label: int | None
) -> tuple[list[int], list[int]]:
    """(annotated, partial): slices along ``axis`` with at least one non-ignore voxel, and those of them that
    also hold ignore voxels (partially annotated: an error for label propagation)."""
    if ignore_label is None:
        return list(range(labels.shape[axis])), []
    other = tuple(i for i in range(3) if i != axis)
    is_ignore = labels == ignore_label
    n_ignore = is_ignore.sum(axis=other)
    per_slice = int(np.prod([labels.shape[i] for i in other]))
    annotated = np.flatnonzero(n_ignore < per_slice)
    partial = np.flatnonzero((n_ignore > 0) & (n_ignore < per_slice))
    return annotated.tolist(), partial.tolist()


def detect_axis(labels: np.ndarray, ignore_label: int) -> list[int]:
    """Axes along which every slice is either entirely ignore or free of ignore, with at least one of each
    (the axis the annotator went through slice by slice)."""
    is_ignore = labels == ignore_label
    axes = []
    for axis in range(3):
        other = tuple(i for i in range(3) if i != axis)
        full = is_ignore.all(axis=other)
        none = ~is_ignore.any(axis=other)
        if np.all(full | none) and full.any() and none.any():
            axes.append(axis)
    return axes


# =============================================================================== datasets
@dataclass
class SparseCase:
    """One training case: files, geometry (SimpleITK order for origin/direction, (z, y, x) for spacing)
    and its annotated slices (after :func:`load_sparse_dataset` checked them)."""

    case_id: str
    images: list[Path]
    label: Path
    annotated: list[int] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    spacing_zyx: tuple[float, ...] = ()
    origin: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()


@dataclass
class SparseDataset:
    folder: Path
    dataset_json: dict
    cases: list[SparseCase]
    axis: int | None
    ignore_label: int | None
    labels: dict[str, int]  # without the ignore label
    annotated_from: str  # 'ignore label' or the JSON file

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def name(self) -> str:
        return self.folder.name


def _resolve_raw(dataset: str | os.PathLike) -> Path:
    """A raw dataset: a folder path, or an id / name under nnUNet_raw."""
    from nnunet_ext.core.paths import resolve_dataset_folder

    return resolve_dataset_folder(dataset, roots=("nnUNet_raw",))


def _label_dict(dataset_json: dict, folder: Path) -> tuple[dict[str, int], int | None]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{folder}/dataset.json has no 'labels' dict. Add one (nnU-Net's format).")
    bad = {k: v for k, v in labels.items() if isinstance(v, (list, tuple)) or isinstance(v, bool)}
    if bad:
        raise UserError(
            f"{folder}/dataset.json uses region-based labels ({', '.join(bad)}); label propagation needs one "
            f"integer per label. Convert the dataset to plain integer labels first."
        )
    ignore = labels.get("ignore")
    plain = {k: int(v) for k, v in labels.items() if k != "ignore"}
    if ignore is not None and int(ignore) <= max(plain.values()):
        raise UserError(
            f"{folder}/dataset.json: the ignore label ({ignore}) must have the highest value (nnU-Net's rule)."
        )
    return plain, (int(ignore) if ignore is not None else None)


def _read_annotated_json(path: str | os.PathLike) -> dict[str, list[int]]:
    data = read_json(path, "annotated-slices file", "pass a JSON object {case identifier: [slice indices]}")
    if not all(
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        for v in data.values()
    ):
        raise UserError(
            f"annotated-slices file {path} must be a JSON object {{case identifier: [slice indices (int)]}}."
        )
    return {str(k): list(v) for k, v in data.items()}


def _geometry(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return (
        tuple(reversed(reader.GetSize())),
        tuple(reversed(reader.GetSpacing())),
        tuple(reader.GetOrigin()),
        tuple(reader.GetDirection()),
    )


def _read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _same_geometry(a, b) -> str:
    """'' if two geometries (shape, spacing, origin, direction) agree, else what differs."""
    names = ("size", "spacing", "origin", "direction")
    diffs = []
    for name, x, y in zip(names, a, b):
        if name == "size":
            if tuple(x) != tuple(y):
                diffs.append(f"size {tuple(x)} vs {tuple(y)}")
        elif not np.allclose(x, y, rtol=1e-4, atol=1e-4):
            diffs.append(f"{name} {tuple(round(v, 4) for v in x)} vs {tuple(round(v, 4) for v in y)}")
    return ", ".join(diffs)


def _read_dataset_json(folder: Path) -> dict:
    return read_json(folder / "dataset.json", "the dataset's dataset.json", "fix or recreate it")


def load_sparse_dataset(
    dataset: str | os.PathLike,
    axis: str | int | None = None,
    annotated_slices: str | os.PathLike | dict | None = None,
    progress: bool = False,
    visit: Callable[[SparseCase, np.ndarray, int], None] | None = None,
    progress_desc: str | None = None,
) -> SparseDataset:
    """Read and check a sparsely annotated nnU-Net raw dataset (id, name under nnUNet_raw, or folder).

    Annotated slices come from ``annotated_slices`` ({case: [indices along axis]}, a dict or a JSON file) or,
    without it, from the ignore label: a slice is annotated if it holds any non-ignore voxel. The slice axis
    is ``axis`` or detected (the axis along which whole slices are ignore; it must agree over all cases).
    Every case is checked (images present with the label's geometry, label values in dataset.json, at least
    one annotated slice, annotated slices not ignore-only and not partially ignore); ALL problems are
    collected and raised as one UserError.

    ``visit(case, labels, axis)``, if given, is called with each good case's label array (read once, for the
    checks) and its slice axis while no problem has been found yet, so a caller can process the cases in the
    same pass (:func:`interpolate_dataset`); after the first problem the remaining cases are only checked. A
    caller must discard what it made if this function raises.
    """
    folder = _resolve_raw(dataset)
    dataset_json = _read_dataset_json(folder)
    labels, ignore_label = _label_dict(dataset_json, folder)
    ending = dataset_json.get("file_ending", "")
    if not any(ending.lower() == e for e in IMAGE_ENDINGS):
        raise UserError(
            f"{folder.name}: file_ending {ending!r} is not supported by label propagation (SimpleITK formats "
            f"{', '.join(IMAGE_ENDINGS)}). Convert the dataset to NIfTI (.nii.gz)."
        )
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    files = get_filenames_of_train_images_and_targets(str(folder), dict(dataset_json))
    if not files:
        raise UserError(f"{folder.name} has no training cases (imagesTr/ is empty).")
    axis = parse_axis(axis)
    given = None
    annotated_from = "ignore label"
    if annotated_slices is not None:
        given = (
            {str(k): list(v) for k, v in annotated_slices.items()}
            if isinstance(annotated_slices, dict)
            else _read_annotated_json(annotated_slices)
        )
        annotated_from = str(annotated_slices) if not isinstance(annotated_slices, dict) else "given slices"
    elif ignore_label is None:
        raise UserError(
            f"{folder.name} has no ignore label in dataset.json, so the annotated slices cannot be told from "
            f"the labels. Pass --annotated-slices FILE.json ({{case: [slice indices]}}) or label unannotated "
            f"slices with an 'ignore' label (the highest label value)."
        )
    if given is not None and axis is None and ignore_label is None:
        raise UserError(
            f"{folder.name}: with --annotated-slices and no ignore label the slice axis cannot be detected; "
            f"pass --axis z|y|x."
        )

    errors: list[str] = []
    if given is not None:
        unknown = sorted(set(given) - set(files))
        if unknown:
            errors.append(
                f"annotated-slices file names cases that are not in {folder.name}: {', '.join(unknown[:10])}"
            )
    allowed = set(labels.values()) | ({ignore_label} if ignore_label is not None else set())
    cases: list[SparseCase] = []
    detected: dict[str, int] = {}
    fully_annotated: set[str] = set()
    iterator = progress_bar(sorted(files.items()), progress_desc or f"checking {folder.name}", progress)
    for case_id, entry in iterator:
        problems: list[str] = []
        label_path = Path(entry["label"])
        images = [Path(p) for p in entry["images"]]
        case = SparseCase(case_id, images, label_path)
        if not label_path.is_file():
            errors.append(f"{case_id}: label file {label_path} is missing")
            continue
        if not images or not all(p.is_file() for p in images):
            errors.append(f"{case_id}: image file(s) missing")
            continue
        try:
            geo = _geometry(label_path)
            for img in images:
                diff = _same_geometry(_geometry(img), geo)
                if diff:
                    problems.append(f"image {img.name} and label differ in geometry ({diff})")
            lab = _read_labels(label_path)
        except RuntimeError as e:  # SimpleITK read errors
            errors.append(f"{case_id}: cannot read ({str(e).strip().splitlines()[-1][:200]})")
            continue
        if lab.ndim != 3:
            errors.append(f"{case_id}: label is {lab.ndim}D; label propagation needs 3D volumes")
            continue
        case.shape, case.spacing_zyx, case.origin, case.direction = lab.shape, geo[1], geo[2], geo[3]
        values = np.unique(lab)
        outside = [int(v) for v in values if int(v) not in allowed]
        if outside:
            problems.append(f"label values {outside} are not in dataset.json's labels ({sorted(allowed)})")
        case_axis = axis
        if given is not None:
            ann = sorted(set(given.get(case_id, [])))
            if case_id not in given or not ann:
                problems.append("no annotated slice (not listed in the annotated-slices file)")
            if case_axis is None:
                case_axis = _case_axis(lab, ignore_label, case_id, problems, detected)
                if case_axis is None and not problems:
                    problems.append("the slice axis cannot be detected (no whole ignore slices); pass --axis")
            if case_axis is not None and ann:
                n = lab.shape[case_axis]
                bad = [i for i in ann if not 0 <= i < n]
                if bad:
                    problems.append(f"annotated slice indices {bad} outside 0..{n - 1} (axis {case_axis})")
                elif ignore_label is not None:
                    stack = np.moveaxis(lab, case_axis, 0)
                    only = [i for i in ann if np.all(stack[i] == ignore_label)]
                    part = [i for i in ann if i not in only and np.any(stack[i] == ignore_label)]
                    if only:
                        problems.append(f"annotated slices {only} hold the ignore label only")
                    if part:
                        problems.append(f"annotated slices {part} are partially ignore (whole slices needed)")
            case.annotated = ann
        else:
            if not np.any(lab != ignore_label):
                problems.append("no annotated slice (every voxel is the ignore label)")
            elif np.any(lab == ignore_label):
                if case_axis is None:
                    case_axis = _case_axis(lab, ignore_label, case_id, problems, detected)
                if case_axis is not None:
                    ann, partial = annotated_slices_of(lab, case_axis, ignore_label)
                    if partial:
                        problems.append(
                            f"slices {partial[:10]} along axis {case_axis} are partially annotated (ignore and "
                            f"labels on one slice); label propagation needs whole slices (pass --axis if it "
                            f"was detected wrongly)"
                        )
                    case.annotated = ann
            else:  # no ignore voxel: every slice is annotated (along the final axis, set below)
                fully_annotated.add(case_id)
                case.annotated = list(range(lab.shape[case_axis if case_axis is not None else 0]))
        if problems:
            errors.extend(f"{case_id}: {p}" for p in problems)
            continue
        cases.append(case)
        if visit is not None and not errors:
            visit(case, lab, case_axis if case_axis is not None else 0)
    if axis is None and detected:
        axes = sorted(set(detected.values()))
        if len(axes) > 1:
            by_axis = {a: [c for c, v in detected.items() if v == a] for a in axes}
            errors.append(
                "the slice axis differs between cases ("
                + "; ".join(f"axis {a}: {', '.join(v[:5])}" for a, v in by_axis.items())
                + "); pass --axis z|y|x"
            )
        axis = axes[0]
    if errors:
        raise UserError(
            f"{folder.name}: {len(errors)} problem(s), nothing was written:\n  "
            + "\n  ".join(errors)
            + "\nFix these cases (or remove them from the dataset) and rerun."
        )
    if axis is None:  # every case fully annotated: nothing to propagate, any axis will do
        axis = 0
    for case in cases:
        if case.case_id in fully_annotated:
            case.annotated = list(range(case.shape[axis]))
    return SparseDataset(folder, dataset_json, cases, axis, ignore_label, labels, annotated_from)


def _case_axis(lab, ignore_label, case_id, problems, detected) -> int | None:
    if ignore_label is None or not np.any(lab == ignore_label):
        return None
    axes = detect_axis(lab, ignore_label)
    if len(axes) == 1:
        detected[case_id] = axes[0]
        return axes[0]
    if not axes:
        is_ignore = lab == ignore_label
        whole = [int(is_ignore.all(axis=tuple(i for i in range(3) if i != a)).sum()) for a in range(3)]
        best = int(np.argmax(whole))
        _, partial = annotated_slices_of(lab, best, ignore_label)
        hint = (
            f"; along axis {best} ({whole[best]} whole ignore slices) slices {partial[:10]} are partially "
            f"annotated (ignore and labels on one slice)"
            if whole[best]
            else ""
        )
        problems.append(
            "the ignore voxels do not form whole slices along any axis, so the annotated slices cannot be "
            f"detected{hint}; annotate whole slices, or pass --annotated-slices FILE.json and --axis"
        )
    else:
        problems.append(f"whole ignore slices along several axes {axes}; pass --axis")
    return None


# =============================================================================== writing datasets
def _label_dtype(max_value: int):
    return np.uint8 if max_value < 256 else np.uint16 if max_value < 65536 else np.int32


def _add_case(
    writer: RawDatasetWriter, case: SparseCase, labels: np.ndarray, file_ending: str, copy: bool
) -> None:
    """A training case of the new dataset: the source images hard-linked (copied if ``copy`` or linking is
    impossible), ``labels`` written with the case's geometry."""
    for c, img in enumerate(case.images):
        writer.add_file(
            img, "imagesTr", f"{case.case_id}_{c:04d}{file_ending}", "copy" if copy else "hardlink"
        )
    writer.write_array(
        labels, "labelsTr", f"{case.case_id}{file_ending}", case.spacing_zyx, case.origin, case.direction
    )


def _copy_test_set(writer: RawDatasetWriter, source: Path, copy: bool) -> None:
    for d in ("imagesTs", "labelsTs"):
        if (source / d).is_dir():
            for f in sorted((source / d).iterdir()):
                if f.is_file():
                    writer.add_file(f, d, f.name, "copy" if copy else "hardlink")


def _raw_root(out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    from nnunet_ext.core.paths import require_folder_var

    return require_folder_var("nnUNet_raw")


def _output_dataset_json(
    src: SparseDataset, name: str, has_ignore: bool, ignore_value: int, text: str
) -> dict:
    dj = {k: v for k, v in src.dataset_json.items() if k not in ("dataset", "labels")}
    dj["name"] = name
    dj["labels"] = dict(src.labels)
    if has_ignore:
        dj["labels"]["ignore"] = int(ignore_value)
    dj["numTraining"] = len(src.cases)
    dj["description"] = f"{text} (nnunet-ext labelprop from {src.name})"
    return dj


def interpolate_dataset(
    source: str | os.PathLike,
    out_id: int,
    method: str = DEFAULT_METHOD,
    *,
    name: str | None = None,
    axis: str | int | None = None,
    annotated_slices: str | os.PathLike | dict | None = None,
    outside: str = "ignore",
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    copy: bool = False,
) -> Path:
    """Write ``Dataset{out_id}_{name}``: the source's training cases with their annotations propagated.

    Images are hard-linked (copied across file systems, or with ``copy``: a hard link IS the source file, so
    editing a derived image in place would change the source), ``imagesTs``/``labelsTs`` too when present;
    labels of the annotated slices are kept exactly; slices between the first and the last annotated slice
    are filled with ``method``; slices outside that range get the ignore label (``outside='ignore'``) or
    background. dataset.json keeps the ignore label only if some voxel remains ignore (its value: the
    source's ignore label, or max label + 1). ``labelprop.json`` records the method, axis and per-case
    annotated slices. Returns the new dataset folder. The source is never modified.
    """
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
    if outside not in OUTSIDE_CHOICES:
        raise UserError(f"--outside must be one of {', '.join(OUTSIDE_CHOICES)}, got {outside!r}.")
    raw_root = _raw_root(out)
    folder = _resolve_raw(source)
    name = name or f"{folder.name.split('_', 1)[1]}LP{method.capitalize()}"
    if folder.parent.resolve() == raw_root.resolve() and folder.name.startswith(f"Dataset{int(out_id):03d}_"):
        raise UserError(f"the output id {out_id} is the source's own id; choose another --out-id.")
    # one pass: every label file is read once, checked and, while no case was bad, interpolated into the
    # writer's hidden temporary folder; on any problem load_sparse_dataset raises (all problems listed) and the
    # temporary folder is removed, so nothing is written
    dataset_json = _read_dataset_json(folder)
    plain, src_ignore = _label_dict(dataset_json, folder)
    ignore_value = src_ignore if src_ignore is not None else max(plain.values()) + 1
    writer = RawDatasetWriter(raw_root, out_id, name, force)
    any_ignore = False

    def fill(case: SparseCase, lab: np.ndarray, case_axis: int) -> None:
        nonlocal any_ignore
        filled = interpolate_volume(
            lab, case.annotated, case_axis, method, case.spacing_zyx, outside, ignore_value
        )
        any_ignore = any_ignore or bool(np.any(filled == ignore_value))
        _add_case(writer, case, filled.astype(_label_dtype(ignore_value)), dataset_json["file_ending"], copy)

    try:
        desc = f"{method} -> Dataset{int(out_id):03d}"
        src = load_sparse_dataset(
            folder, axis, annotated_slices, progress=progress, visit=fill, progress_desc=desc
        )
        per_case = {c.case_id: {"annotated": c.annotated, "shape": list(c.shape)} for c in src.cases}
        _copy_test_set(writer, src.folder, copy)
        dj = _output_dataset_json(
            src,
            writer.name,
            any_ignore,
            ignore_value,
            f"labels propagated ({method})",
        )
        meta = {
            "step": "interpolate",
            "method": method,
            "outside": outside,
            "axis": src.axis,
            "source": str(src.folder),
            "annotated_from": src.annotated_from,
            "ignore_label": ignore_value if any_ignore else None,
            "cases": per_case,
        }
        return writer.finish(dj, {METADATA_FILE: meta})
    except BaseException:
        writer.abort()
        raise


# =============================================================================== pseudo labels
def merge_annotations(
    prediction: np.ndarray, sparse: np.ndarray, annotated: Sequence[int], axis: int, ignore_label: int | None
) -> np.ndarray:
    """The prediction with every annotated voxel of ``sparse`` written back (kept exactly): voxels of the
    annotated slices (along ``axis``) that are not the ignore label."""
    if prediction.shape != sparse.shape:
        raise ValueError(f"prediction {prediction.shape} and labels {sparse.shape} differ in shape")
    out = np.moveaxis(prediction.copy(), axis, 0)
    src = np.moveaxis(sparse, axis, 0)
    ann = np.asarray(sorted(annotated), dtype=np.int64)
    keep = src[ann] != ignore_label if ignore_label is not None else np.ones_like(src[ann], dtype=bool)
    out[ann] = np.where(keep, src[ann], out[ann])
    return np.moveaxis(out, 0, axis)


def model_folder(
    model: str | os.PathLike | None = None,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    trainer: str = "nnUNetTrainer",
    plans: str = "nnUNetPlans",
) -> Path:
    """A trained model's folder: ``model`` itself, or nnU-Net's results folder of dataset/config/trainer."""
    if model is not None:
        path = Path(model)
        if not (path / "dataset.json").is_file() or not (path / "plans.json").is_file():
            raise UserError(
                f"{path} is not an nnU-Net model folder (no dataset.json + plans.json); pass "
                f"<nnUNet_results>/DatasetX/<Trainer>__<Plans>__<config> or use -d/-c/-tr."
            )
        return path
    if dataset is None:
        raise UserError("no model given: pass --model FOLDER or -d DATASET (with -c, -tr, -p).")
    from nnunet_ext.core.paths import resolve_dataset

    folder = resolve_dataset(dataset, "nnUNet_results")
    path = folder / f"{trainer}__{plans}__{configuration}"
    if not path.is_dir():
        available = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise UserError(
            f"no trained model {path.name} in {folder}. Available: {', '.join(available) or 'none'}. "
            f"Check -c/-tr/-p or train it first (nnUNetv2_train)."
        )
    return path


def _available_folds(model: Path, checkpoint: str) -> list[str]:
    folds = []
    for p in sorted(model.glob("fold_*")):
        if (p / checkpoint).is_file():
            folds.append(p.name[len("fold_") :])
    return folds


def pseudo_label_dataset(
    source: str | os.PathLike,
    model: str | os.PathLike,
    out_id: int,
    *,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    name: str | None = None,
    axis: str | int | None = None,
    annotated_slices: str | os.PathLike | dict | None = None,
    device: str = "auto",
    tta: bool = True,
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    num_processes: int | None = None,
    copy: bool = False,
) -> Path:
    """Predict the source's training scans with ``model`` (an nnU-Net model folder; ``folds`` ensembled,
    default all folds with ``checkpoint``), write the annotated voxels back over the predictions and write
    the next-round dataset ``Dataset{out_id}_{name}`` (dense labels, no ignore label).

    Prediction is nnU-Net's ``nnUNetPredictor.predict_from_files`` (mirroring on unless ``tta=False``): up to
    ``num_processes`` background processes read and preprocess the next cases and as many resample and write
    the finished predictions while the network predicts (nnUNetv2_predict's ``-npp``/``-nps``);
    ``num_processes=0`` predicts case by case in this process (``predict_from_files_sequential``). Default: 3
    on a GPU, 0 on the CPU (where the network already uses every core and the workers only compete; on 2 cores
    they made 8 small cases slower, docs/labelprop.md). The annotated voxels are then written back in
    ``max(1, num_processes)`` threads."""
    from nnunet_ext.core import inference

    if num_processes is not None and int(num_processes) < 0:
        raise UserError(f"--num-processes must be 0 (no worker processes) or more, got {num_processes}.")
    raw_root = _raw_root(out)
    model = Path(model)
    folder = _resolve_raw(source)
    name = name or f"{folder.name.split('_', 1)[1]}LPPseudo"
    src = load_sparse_dataset(folder, axis, annotated_slices, progress=progress)
    model_dj = read_json(
        model / "dataset.json",
        "the model's dataset.json",
        "copy the dataset.json of the dataset the model was trained on into the model folder, or retrain it",
    )
    if not isinstance(model_dj.get("labels"), dict):
        raise UserError(
            f"the model's dataset.json {model / 'dataset.json'} has no 'labels' dict; copy the dataset.json of the "
            f"dataset the model was trained on into the model folder."
        )
    try:
        model_labels = {k: int(v) for k, v in model_dj["labels"].items() if k != "ignore"}
    except (TypeError, ValueError):
        raise UserError(
            f"the model's dataset.json {model / 'dataset.json'} has region labels {model_dj['labels']}; "
            f"pseudo-labelling needs a model trained on integer labels."
        ) from None
    if model_labels != src.labels:
        raise UserError(
            f"the model {model} was trained with labels {model_labels}, the source {src.name} has "
            f"{src.labels}; pseudo-label with a model trained on this label set."
        )
    if src.file_ending != model_dj.get("file_ending"):
        raise UserError(
            f"file endings differ: model {model_dj.get('file_ending')}, source {src.file_ending}."
        )
    n_channels = len(model_dj.get("channel_names", model_dj.get("modality", {})))
    if any(len(c.images) != n_channels for c in src.cases):
        raise UserError(f"the model expects {n_channels} channel(s) per case; {src.name}'s cases differ.")
    available = _available_folds(model, checkpoint)
    folds = [str(f) for f in folds] if folds else [f for f in available if f != "all"] or available
    missing = [f for f in folds if f not in available]
    if not folds or missing:
        raise UserError(
            f"{model}: no {checkpoint} for fold(s) {', '.join(missing) or '(any)'}; available: "
            f"{', '.join(available) or 'none'}. Finish those trainings or pass -f with available folds."
        )
    torch_device = inference.torch_device(device)
    writer = RawDatasetWriter(raw_root, out_id, name, force)
    try:
        predictor = inference.predictor_from_model_folder(
            model, folds, checkpoint, torch_device, tta=tta, progress=progress
        )
        pred_dir = writer.tmp / ".predictions"
        pred_dir.mkdir()
        inputs = [[str(p) for p in case.images] for case in src.cases]
        outputs = [str(pred_dir / case.case_id) for case in src.cases]
        if num_processes is None:
            num_processes = 3 if torch_device.type == "cuda" else 0
        if num_processes > 0:
            n = min(int(num_processes), len(inputs))
            predictor.predict_from_files(inputs, outputs, False, True, n, n)
        else:
            predictor.predict_from_files_sequential(inputs, outputs, False, True, None)
        dtype = _label_dtype(max(src.labels.values()))

        def merge(case: SparseCase) -> None:
            pred = _read_labels(pred_dir / f"{case.case_id}{src.file_ending}")
            sparse = _read_labels(case.label)
            merged = merge_annotations(pred, sparse, case.annotated, src.axis, src.ignore_label)
            _add_case(writer, case, merged.astype(dtype), src.file_ending, copy)

        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max(1, int(num_processes))) as pool:
            futures = [pool.submit(merge, case) for case in src.cases]
            for f in progress_bar(
                as_completed(futures), f"annotations -> {writer.target.name}", progress, len(futures)
            ):
                f.result()
        per_case = {c.case_id: {"annotated": c.annotated, "shape": list(c.shape)} for c in src.cases}
        shutil.rmtree(pred_dir)
        _copy_test_set(writer, src.folder, copy)
        dj = _output_dataset_json(src, writer.name, False, 0, f"pseudo-labels of {model.name}")
        meta = {
            "step": "pseudo",
            "axis": src.axis,
            "source": str(src.folder),
            "annotated_from": src.annotated_from,
            "model": str(model),
            "folds": folds,
            "checkpoint": checkpoint,
            "tta": tta,
            "ignore_label": None,
            "cases": per_case,
        }
        return writer.finish(dj, {METADATA_FILE: meta})
    except BaseException:
        writer.abort()
        raise


# =============================================================================== CLI
def _add_source_args(p) -> None:
    p.add_argument(
        "source", metavar="SOURCE", help="sparse raw dataset: id, name under nnUNet_raw, or folder"
    )
    p.add_argument("--out-id", type=int, required=True, help="id of the NEW dataset to write")
    p.add_argument("--name", default=None, help="name of the new dataset (default: derived from the source)")
    p.add_argument(
        "--axis", default=None, help="slice axis of the (z, y, x) array: z, y or x (default: detect)"
    )
    p.add_argument(
        "--annotated-slices",
        default=None,
        metavar="JSON",
        help="JSON {case: [slice indices]} of the annotated slices (default: slices that are not ignore)",
    )
    p.add_argument("--out", default=None, help="raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset with --out-id")
    p.add_argument(
        "--copy",
        action="store_true",
        help="copy the images instead of hard-linking them (a hard-linked image is the source's file: editing it "
        "in place changes the source)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_args(p, required: bool) -> None:
    p.add_argument(
        "--model", default=None, help="trained model folder (<results>/DatasetX/<Tr>__<Plans>__<cfg>)"
    )
    p.add_argument("-d", "--model-dataset", default=None, help="... or the model's dataset id/name")
    p.add_argument(
        "-c", "--configuration", default="3d_fullres", help="model configuration (default 3d_fullres)"
    )
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="model trainer (default nnUNetTrainer)")
    p.add_argument(
        "-p", "--plans", default="nnUNetPlans", help="model plans identifier (default nnUNetPlans)"
    )
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: all trained)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument(
        "-device", "--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)"
    )
    p.add_argument(
        "--disable_tta", "--disable-tta", action="store_true", help="no mirroring at prediction (faster)"
    )


def _cmd_interpolate(args) -> int:
    path = interpolate_dataset(
        args.source,
        args.out_id,
        args.method,
        name=args.name,
        axis=args.axis,
        annotated_slices=args.annotated_slices,
        outside=args.outside,
        out=args.out,
        force=args.force,
        progress=not args.quiet,
        copy=args.copy,
    )
    print(f"wrote {path}")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.out_id} -c 3d_fullres --verify_dataset_integrity")
    return 0


def _cmd_pseudo(args) -> int:
    model = model_folder(args.model, args.model_dataset, args.configuration, args.trainer, args.plans)
    path = pseudo_label_dataset(
        args.source,
        model,
        args.out_id,
        folds=args.folds,
        checkpoint=args.checkpoint,
        name=args.name,
        axis=args.axis,
        annotated_slices=args.annotated_slices,
        device=args.device,
        tta=not args.disable_tta,
        out=args.out,
        force=args.force,
        progress=not args.quiet,
        num_processes=args.num_processes,
        copy=args.copy,
    )
    print(f"wrote {path}")
    return 0


def add_propagation_parsers(sub) -> None:
    """Register ``interpolate`` and ``pseudo`` on the ``labelprop`` command's subparsers
    (:mod:`nnunet_ext.labelprop.cli` builds the command)."""
    p = sub.add_parser(
        "interpolate",
        help="propagate annotated slices to the unannotated ones; writes a new raw dataset",
        description="Fill the slices between the first and last annotated slice of every case (nearest or "
        "shape-based interpolation) and write a NEW nnU-Net raw dataset (the source is not modified).",
    )
    _add_source_args(p)
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"default {DEFAULT_METHOD}")
    p.add_argument(
        "--outside",
        choices=OUTSIDE_CHOICES,
        default="ignore",
        help="label of the slices outside the annotated range (default ignore)",
    )
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser(
        "pseudo",
        help="pseudo-label the training scans with a trained model; annotated voxels kept; new raw dataset",
        description="Predict the source's training scans with a trained nnU-Net model (ensemble of folds), "
        "write the annotated voxels back over the predictions and write the next-round raw dataset.",
    )
    _add_source_args(p)
    _add_model_args(p, required=True)
    p.add_argument(
        "-np",
        "--num-processes",
        type=int,
        default=None,
        help="background processes that preprocess the next cases and export finished predictions while the "
        "network predicts (as nnUNetv2_predict -npp/-nps; default 3 on a GPU, 0 on the CPU); 0: case by case, "
        "no worker processes",
    )
    p.set_defaults(func=_cmd_pseudo)
