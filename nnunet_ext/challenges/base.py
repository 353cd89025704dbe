"""What every challenge definition shares: label/metric/submission description, the raw-dataset writer used by
the converters, the checks they run on what they read, and the conversion driver.

A challenge module (``kipa22.py``, ``amos22.py``, ...) subclasses :class:`Challenge` and fills in

* its definition: ``labels`` (name -> value, the challenge's own), ``channel_names``, ``layout`` (the source
  folder layout the converter expects; quoted in its errors), ``rules`` (:class:`MetricRules`: official
  metrics, empty-mask conventions, spacing) and :meth:`Challenge.eval_classes` (the scored classes, e.g.
  KiTS21's hierarchical ones, with their surface-Dice tolerances);
* the converter: :meth:`Challenge.find_cases` (source cases and what it skipped) and, where the default
  copy is not enough, :meth:`Challenge.write_case`;
* the submission format: :meth:`Challenge.submission_name` and :meth:`Challenge.write_submission`.

Converters never modify the source: they only read it and write a new nnU-Net raw dataset into a hidden
temporary folder beside the target, which is renamed into place at the end (nothing is left behind on
error). Every case is checked (missing files, label values outside the challenge's definition,
image/label geometry); all problems are listed in one error, or with ``skip_bad`` the bad cases are left out
and reported.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ext.errors import UserError
from nnunet_ext.io import (
    atomic_write_json,
    check_dataset_id_and_name,
    existing_datasets_with_id,
    make_temp_dir,
    replace_dataset,
)

META_KEY = "nnunet_ext_challenge"
FILE_ENDING = ".nii.gz"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".mhd")
ALL_METRICS = ("Dice", "HD", "HD95", "HD95_pooled", "ASSD", "AVD", "NSD")
DISTANCE_METRICS = ("HD", "HD95", "HD95_pooled", "ASSD", "AVD")


# ============================================================================================ definitions
@dataclass(frozen=True)
class EvalClass:
    """A scored class: the voxels whose label is in ``labels`` (a region for hierarchical classes)."""

    name: str
    labels: tuple[int, ...]
    tolerance: float | None = None  # mm, normalised surface Dice


@dataclass(frozen=True)
class MetricRules:
    """How a challenge scores: which metrics, and the conventions for empty masks and spacing.

    ``both_empty`` / ``one_empty``: metric -> value when prediction and reference are both empty / exactly
    one of them is empty (a challenge with its own rule for empty masks overrides :meth:`Challenge.score_case`).
    ``unit_spacing``: distances in voxels (spacing 1 along every axis) instead of mm. ``ignore_label``:
    reference voxels with this value are left out (prediction and reference set to background there).
    ``dice_smooth``: added to the Dice denominator (DoDNet's evaluation adds 1). ``assumed``: each value we had
    to choose because no official definition could be found (listed by ``evaluate --help`` and in the JSON).
    """

    metrics: tuple[str, ...]
    both_empty: dict
    one_empty: dict
    unit_spacing: bool = False
    ignore_label: int | None = None
    dice_smooth: float = 0.0
    default_tolerance: float | None = None
    notes: tuple[str, ...] = ()
    assumed: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "metrics": list(self.metrics),
            "both_empty": self.both_empty,
            "one_empty": self.one_empty,
            "unit_spacing": self.unit_spacing,
            "ignore_label": self.ignore_label,
            "dice_smooth": self.dice_smooth,
            "notes": list(self.notes),
            "assumed_without_official_definition": list(self.assumed),
        }


DEFAULT_BOTH_EMPTY = {"Dice": 1.0, "NSD": 1.0, **{m: 0.0 for m in DISTANCE_METRICS}}
DEFAULT_ONE_EMPTY = {"Dice": 0.0, "NSD": 0.0, **{m: math.inf for m in DISTANCE_METRICS}}


def class_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, ...],
    metrics: tuple[str, ...],
    rules: MetricRules,
    tolerance: float | None,
) -> dict[str, float]:
    """The ``metrics`` of two boolean masks on one grid, with the empty-mask conventions of ``rules``."""
    p_empty, g_empty = not pred.any(), not gt.any()
    out: dict[str, float] = {}
    distances = None
    for metric in metrics:
        if p_empty and g_empty:
            value = rules.both_empty.get(metric, DEFAULT_BOTH_EMPTY[metric])
        elif p_empty or g_empty:
            value = rules.one_empty.get(metric, DEFAULT_ONE_EMPTY[metric])
        elif metric == "Dice":
            inter = np.logical_and(pred, gt).sum()
            value = 2.0 * inter / (pred.sum() + gt.sum() + rules.dice_smooth)
        elif metric == "NSD":
            if tolerance is None:
                raise UserError("NSD needs a tolerance; pass --tolerance MM.")
            from nnunet_ext.metrics import normalized_surface_dice

            value = normalized_surface_dice(pred, gt, spacing, tolerance)
        else:
            if distances is None:
                from nnunet_ext.metrics import distance_metrics

                distances = distance_metrics(pred, gt, spacing)
            value = distances[metric]
        out[metric] = float(value)
    return out


@dataclass
class SourceCase:
    """One case found in a challenge's source folder."""

    case_id: str  # nnU-Net case identifier in the converted dataset
    images: list[Path]  # one file per channel (or, for COSMOS, the case folder)
    label: Path | None  # None: unlabelled (test) case
    split: str = "Tr"  # "Tr" or "Ts"
    original: str = ""  # the name the challenge uses (submission file names)
    extra: dict = field(default_factory=dict)


@dataclass
class ConvertResult:
    folder: Path
    converted: dict  # split -> [case ids]
    skipped: list  # [(what, why)]


class Challenge:
    """Base class of a challenge definition (see the module docstring)."""

    name: str = ""
    title: str = ""
    url: str = ""
    labels: dict[str, int] = {}
    channel_names: dict[str, str] = {"0": "CT"}
    dataset_name: str = ""
    reader_writer: str | None = None
    layout: str = ""
    rules: MetricRules = MetricRules(("Dice",), {"Dice": 1.0}, {"Dice": 0.0})
    submission_format: str = "<case>.nii.gz, the challenge's label values"
    options: tuple = ()  # (flag, kwargs for argparse) added to `nnunet-ext convert NAME`

    # ---------------------------------------------------------------- definition
    def eval_classes(self, case_id: str) -> list[EvalClass]:
        return [EvalClass(n, (v,), self.rules.default_tolerance) for n, v in self.labels.items() if v != 0]

    def allowed_label_values(self) -> set[int]:
        return set(self.labels.values())

    def expected_layout(self) -> str:
        return f"expected layout of the {self.title} source folder:\n{self.layout}"

    # ---------------------------------------------------------------- scoring
    def score_case(
        self,
        pred: LabelVolume,
        gt: LabelVolume,
        case_id: str,
        metrics: tuple[str, ...],
        tolerance: float | None = None,
    ) -> dict[str, dict[str, float]]:
        """``{class: {metric: value}}`` for one case whose prediction and reference share a grid (checked by
        the caller). The default scores each of :meth:`eval_classes` on the native grid with
        :func:`class_metrics` and :attr:`rules`; a challenge whose official evaluation resamples or uses its
        own surface definition overrides this."""
        rules = self.rules
        spacing = (1.0,) * gt.array.ndim if rules.unit_spacing else gt.spacing
        valid = None if rules.ignore_label is None else gt.array != rules.ignore_label
        result = {}
        for cls in self.eval_classes(case_id):
            p, g = np.isin(pred.array, cls.labels), np.isin(gt.array, cls.labels)
            if valid is not None:
                p &= valid
                g &= valid
            result[cls.name] = class_metrics(
                p, g, spacing, metrics, rules, self.tolerance_for(cls, tolerance)
            )
        return result

    def tolerance_for(self, cls: EvalClass, tolerance: float | None = None) -> float | None:
        """The NSD tolerance (mm) of ``cls``: ``tolerance`` (the user's) if given, else the class's own, else
        the challenge's default."""
        if tolerance is not None:
            return tolerance
        return cls.tolerance if cls.tolerance is not None else self.rules.default_tolerance

    # ---------------------------------------------------------------- converter
    def find_cases(self, source: Path, **options) -> tuple[list[SourceCase], list[tuple[str, str]]]:
        raise NotImplementedError

    def output_labels(self, **options) -> dict:
        return dict(self.labels)

    def extra_dataset_json(self, cases: list[SourceCase], **options) -> dict:
        return {}

    def write_case(self, case: SourceCase, writer: RawDatasetWriter, **options) -> list[str]:
        """Check one case and copy it into ``writer``; return its problems (nothing is kept for a bad case)."""
        problems = check_case(case, self.allowed_label_values())
        if problems:
            return problems
        for c, image in enumerate(case.images):
            writer.copy_image(image, case.case_id, c, case.split)
        if case.label is not None:
            writer.copy_label(case.label, case.case_id, case.split)
        return []

    # ---------------------------------------------------------------- submission
    def submission_name(self, case_id: str, meta: dict) -> str:
        return f"{meta.get('original') or case_id}{FILE_ENDING}"

    def write_submission(self, predictions: dict[str, Path], meta: dict, out: Path) -> list[str]:
        """Write the predictions of every expected case (``predictions``: case id -> file) into ``out``;
        return the written file names (relative to ``out``)."""
        allowed = self.allowed_label_values()
        written = []
        for case_id, path in sorted(predictions.items()):
            volume = read_label_volume(path)
            array = volume.array
            bad = sorted(set(np.unique(array).tolist()) - allowed)
            if bad:
                raise UserError(
                    f"prediction {path} holds label values {bad} that {self.title} does not define "
                    f"({self.labels}); predict with a model trained on the converted dataset."
                )
            name = self.submission_name(case_id, meta["cases"].get(case_id, {}))
            volume.write_like(out / name, array)
            written.append(name)
        return written


# ============================================================================================ reading
def _sitk():
    import SimpleITK as sitk

    return sitk


def strip_suffix(name: str) -> str:
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def is_image_file(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p) and not p.name.startswith("."))


def _geometry_sitk(path: Path):
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {
        "size": tuple(reader.GetSize()),
        "spacing": np.array(reader.GetSpacing()),
        "origin": np.array(reader.GetOrigin()),
        "direction": np.array(reader.GetDirection()),
    }


def _geometry_nibabel(path: Path):
    import nibabel

    img = nibabel.load(str(path))
    return {"size": tuple(img.shape[:3]), "affine": np.asarray(img.affine)}


def geometry_mismatch(image: Path, label: Path) -> str | None:
    """None if ``image`` and ``label`` share size, spacing, origin and direction; else what differs.

    SimpleITK reads the headers; files SimpleITK refuses (e.g. AMOS's non-orthonormal direction cosines)
    are compared through nibabel's affines instead."""
    try:
        a, b = _geometry_sitk(image), _geometry_sitk(label)
    except RuntimeError:
        try:
            a, b = _geometry_nibabel(image), _geometry_nibabel(label)
        except Exception as e:  # noqa: BLE001 - any reader failure is a problem of the case
            return f"cannot read the headers of {image.name} / {label.name}: {e}"
    diffs = []
    for key in a:
        va, vb = a[key], b[key]
        if key == "size":
            if va != vb:
                diffs.append(f"size {va} vs {vb}")
        elif not np.allclose(va, vb, rtol=1e-4, atol=1e-3):
            diffs.append(f"{key} {np.round(va, 4).tolist()} vs {np.round(vb, 4).tolist()}")
    return "; ".join(diffs) or None


def incomplete_image(path: Path) -> str | None:
    """None if the image file holds every voxel its header promises; else what is wrong. SimpleITK reads a
    truncated NIfTI without an error and fills the missing voxels with 0, so every NIfTI file is read to its end
    (decompressed) and its size compared with the header's; other formats are read fully by SimpleITK."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        try:
            _sitk().ReadImage(str(path))
        except RuntimeError as e:
            return f"{path.name} cannot be read: {str(e).strip().splitlines()[-1]}"
        return None
    import nibabel

    try:
        header = nibabel.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * int(
            header.get_data_dtype().itemsize
        )
    except Exception as e:  # noqa: BLE001 - any header problem is a problem of this file
        return f"{path.name} has no readable NIfTI header (truncated, or not a NIfTI file): {e}"
    size = 0
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"{path.name} is truncated or corrupt ({e})"
    if size < expected:
        return f"{path.name} is truncated: {size} bytes of the {expected} its header promises"
    return None


def read_label_array(path: Path) -> np.ndarray:
    try:
        return _sitk().GetArrayFromImage(_sitk().ReadImage(str(path)))
    except RuntimeError:
        import nibabel

        return np.asanyarray(nibabel.load(str(path)).dataobj)


def bad_label_values(array: np.ndarray, allowed: set[int]) -> list:
    values = np.unique(array)
    return [v.item() for v in values if v != np.round(v) or int(v) not in allowed]


def check_case(case: SourceCase, allowed: set[int]) -> list[str]:
    """Problems of a copy-converted case: missing files, label values, geometry of every image vs label."""
    files = [p for p in [*case.images, case.label] if p is not None]
    problems = [f"missing file {p}" for p in files if not p.is_file()]
    if problems:
        return problems
    problems = [problem for p in files if (problem := incomplete_image(p))]
    if problems:
        return problems
    if case.label is not None:
        try:
            bad = bad_label_values(read_label_array(case.label), allowed)
        except Exception as e:  # noqa: BLE001
            return [f"cannot read {case.label}: {e}"]
        if bad:
            problems.append(
                f"{case.label.name}: label values {bad} are not in the challenge's definition {sorted(allowed)}"
            )
    reference = case.label or case.images[0]
    for image in case.images:
        if image == reference:
            continue
        diff = geometry_mismatch(image, reference)
        if diff:
            problems.append(f"geometry of {image.name} differs from {reference.name}: {diff}")
    return problems


@dataclass
class LabelVolume:
    """A label map as a (z, y, x) array with its spacing (z, y, x), and what is needed to write one like it."""

    array: np.ndarray
    spacing: tuple[float, ...]
    reference: object  # SimpleITK image, or nibabel image when SimpleITK cannot read the file
    reader: str  # "sitk" or "nibabel"

    def write_like(self, path: Path, array: np.ndarray) -> None:
        """Write ``array`` ((z, y, x), uint8) with this volume's geometry."""
        if self.reader == "sitk":
            write_label_like(path, array, self.reference)
            return
        import nibabel

        ref = self.reference
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(
            nibabel.Nifti1Image(np.asarray(array).transpose(2, 1, 0).astype(np.uint8), ref.affine, header),
            str(path),
        )


def read_label_volume(path: Path, reader: str | None = None) -> LabelVolume:
    """SimpleITK, or nibabel for files SimpleITK refuses (non-orthonormal direction cosines, as in AMOS);
    ``reader`` forces one. A truncated or corrupt file is refused (SimpleITK would read it as zeros)."""
    _refuse_incomplete(path)
    return _read_volume(path, reader)


def _refuse_incomplete(path: Path) -> None:
    problem = incomplete_image(path)
    if problem:
        raise UserError(
            f"{path} {problem.removeprefix(path.name + ' ')}; replace the file with a complete copy."
        )


def _read_volume(path: Path, reader: str | None = None) -> LabelVolume:
    if reader in (None, "sitk"):
        try:
            image = _sitk().ReadImage(str(path))
            spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
            return LabelVolume(_sitk().GetArrayFromImage(image), spacing, image, "sitk")
        except RuntimeError:
            if reader == "sitk":
                raise
    import nibabel

    image = nibabel.load(str(path))
    array = np.asanyarray(image.dataobj)
    if array.ndim != 3:
        raise UserError(f"{path} is not a 3D image (shape {array.shape}).")
    spacing = tuple(float(z) for z in reversed(image.header.get_zooms()[:3]))
    return LabelVolume(array.transpose(2, 1, 0), spacing, image, "nibabel")


def read_label_pair(a: Path, b: Path) -> tuple[LabelVolume, LabelVolume]:
    """Both files with the same reader (nibabel for both if SimpleITK refuses either); truncated or corrupt
    files are refused."""
    _refuse_incomplete(a)
    _refuse_incomplete(b)
    first = _read_volume(a)
    try:
        second = _read_volume(b, first.reader)
    except RuntimeError:
        return _read_volume(a, "nibabel"), _read_volume(b, "nibabel")
    return first, second


def write_label_like(path: Path, array: np.ndarray, reference) -> None:
    """Write a label array (uint8) with the geometry of the SimpleITK image ``reference``."""
    sitk = _sitk()
    out = sitk.GetImageFromArray(
        np.asarray(array).astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)
    )
    out.CopyInformation(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path), True)


# ============================================================================================ writing
class RawDatasetWriter:
    """A new ``nnUNet_raw/DatasetXXX_NAME`` built in a hidden temp folder and renamed into place by
    :meth:`finish`; ``force`` replaces an existing dataset with the same id (refused otherwise)."""

    def __init__(self, raw_root: Path, dataset_id: int, name: str, force: bool, link: bool = False):
        check_dataset_id_and_name(dataset_id, name)
        self.raw_root = Path(raw_root)
        self.created_root = (
            not self.raw_root.exists()
        )  # removed again by abort(), so a failure leaves nothing
        self.raw_root.mkdir(parents=True, exist_ok=True)
        self.id = int(dataset_id)
        self.target = self.raw_root / f"Dataset{self.id:03d}_{name}"
        existing = existing_datasets_with_id(self.raw_root, self.id)
        if existing and not force:
            raise UserError(
                f"dataset id {self.id} already exists: {', '.join(str(p) for p in existing)}; pass --force to "
                f"replace it, or choose another --id."
            )
        self.link = link
        self.tmp = make_temp_dir(f".{self.target.name}.tmp-", self.raw_root)
        self.files: dict[str, list[Path]] = {}
        self.group = ""

    def begin_case(self, case_id: str) -> None:
        """Files written from now on belong to source case ``case_id`` (:meth:`drop_case` removes them)."""
        self.group = case_id

    def _dst(self, case_id: str, sub: str, name: str) -> Path:
        dst = self.tmp / sub / name
        try:
            dst.parent.mkdir(exist_ok=True)
        except OSError as e:
            raise self._write_error(dst.parent, e) from e
        if dst.exists():
            raise UserError(f"two source cases map to the same output file {sub}/{name}; rename one of them.")
        self.files.setdefault(self.group or case_id, []).append(dst)
        return dst

    def _write_error(self, dst: Path, error: Exception) -> UserError:
        """A failed write into the new dataset: never a problem of the source case, never skipped."""
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]
        return UserError(
            f"cannot write {dst.relative_to(self.tmp)} of the new dataset in {self.raw_root}: {reason}; nothing "
            f"was written (the partial dataset was removed). Free space on that disk or make it writable "
            f"(or pass another --out), then rerun."
        )

    def _copy(self, src: Path, dst: Path) -> None:
        low = src.name.lower()
        if low.endswith(".nii.gz") and self.link:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        if low.endswith((".nii.gz", ".nii")):  # a gzipped .nii is a valid .nii.gz
            self._copy_bytes(src, dst, compress=low.endswith(".nii"))
        else:
            image = _sitk().ReadImage(str(src))  # a read error is the source's problem
            self._write_sitk(image, dst)

    def _copy_bytes(self, src: Path, dst: Path, compress: bool) -> None:
        """Copy ``src`` to ``dst`` (gzipped if ``compress``); read errors propagate as they are (a problem of
        the source case), write errors become :meth:`_write_error`."""
        with open(src, "rb") as fi:
            try:
                fo = gzip.open(dst, "wb", compresslevel=1) if compress else open(dst, "wb")
            except OSError as e:
                raise self._write_error(dst, e) from e
            with fo:
                while chunk := fi.read(1 << 22):
                    try:
                        fo.write(chunk)
                    except OSError as e:
                        raise self._write_error(dst, e) from e
                try:
                    fo.flush()
                except OSError as e:
                    raise self._write_error(dst, e) from e

    def _write_sitk(self, image, dst: Path) -> None:
        try:
            _sitk().WriteImage(image, str(dst), True)
        except (RuntimeError, OSError) as e:
            raise self._write_error(dst, e) from e

    def copy_image(self, src: Path, case_id: str, channel: int, split: str = "Tr") -> None:
        self._copy(src, self._dst(case_id, f"images{split}", f"{case_id}_{channel:04d}{FILE_ENDING}"))

    def copy_label(self, src: Path, case_id: str, split: str = "Tr") -> None:
        self._copy(src, self._dst(case_id, f"labels{split}", f"{case_id}{FILE_ENDING}"))

    def write_image(self, image, case_id: str, channel: int, split: str = "Tr") -> None:
        dst = self._dst(case_id, f"images{split}", f"{case_id}_{channel:04d}{FILE_ENDING}")
        self._write_sitk(image, dst)

    def write_label(self, array: np.ndarray, reference, case_id: str, split: str = "Tr") -> None:
        dst = self._dst(case_id, f"labels{split}", f"{case_id}{FILE_ENDING}")
        try:
            write_label_like(dst, array, reference)
        except (RuntimeError, OSError) as e:
            raise self._write_error(dst, e) from e

    def drop_case(self, case_id: str) -> None:
        for p in self.files.pop(case_id, []):
            p.unlink(missing_ok=True)

    def finish(self, dataset_json: dict) -> Path:
        try:
            atomic_write_json(self.tmp / "dataset.json", dataset_json)
            return replace_dataset(self.tmp, self.target, self.id)
        except OSError as e:
            raise self._write_error(self.tmp / "dataset.json", e) from e

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created_root:
            try:
                self.raw_root.rmdir()
            except OSError:  # not empty: something else was put there meanwhile
                pass


def raw_root(out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    from nnunet_ext.paths import require_folder_var

    return require_folder_var("nnUNet_raw")


def _progress(items: Sequence, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", file=sys.stderr)


def convert(
    challenge: Challenge,
    source: str | os.PathLike,
    dataset_id: int,
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    force: bool = False,
    link: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    **options,
) -> ConvertResult:
    """Convert ``source`` (the challenge's download) into ``Dataset{dataset_id}_{name}``."""
    source = Path(source).expanduser()
    if not source.is_dir():
        raise UserError(f"source folder {source} does not exist.\n{challenge.expected_layout()}")
    root = raw_root(out)
    try:
        if source.resolve().is_relative_to(root.resolve()) and source.resolve().name.startswith(
            f"Dataset{int(dataset_id):03d}_"
        ):
            raise UserError(f"the output id {dataset_id} is the source itself; choose another --id.")
    except ValueError:
        pass
    cases, skipped = challenge.find_cases(source, **options)
    if not cases:
        raise UserError(f"no cases found in {source}.\n{challenge.expected_layout()}")
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(
            f"several source files map to the same case ids {dupes}; the source layout is ambiguous."
        )
    writer = RawDatasetWriter(root, dataset_id, name or challenge.dataset_name, force, link)
    bad: list[tuple[str, list[str]]] = []
    done: list[SourceCase] = []
    try:
        for case in _progress(cases, f"convert {challenge.name} -> {writer.target.name}", progress):
            writer.begin_case(case.case_id)
            try:
                problems = challenge.write_case(case, writer, **options)
            except UserError:
                raise
            except ValueError as e:
                problems = [str(e)]
            except Exception as e:  # noqa: BLE001 - unreadable file etc.: a problem of this case
                problems = [f"{type(e).__name__}: {e}"]
            if problems:
                writer.drop_case(case.case_id)
                bad.append((case.case_id, problems))
            else:
                # a converter may write one source case as several cases (COSMOS22: left / right halves)
                for case_id, extra in case.extra.pop("outputs", None) or [(case.case_id, {})]:
                    done.append(
                        SourceCase(
                            case_id,
                            case.images,
                            case.label,
                            case.split,
                            case.original,
                            {**case.extra, **extra},
                        )
                    )
        if bad and not skip_bad:
            lines = [f"  {cid}: " + "; ".join(p) for cid, p in bad]
            raise UserError(
                f"{len(bad)} of {len(cases)} cases of {source} have problems (nothing was written):\n"
                + "\n".join(lines)
                + "\nFix the source, or pass --skip-bad to convert the other cases and leave these out."
            )
        if not [c for c in done if c.split == "Tr"]:
            raise UserError(
                f"no training case of {source} could be converted.\n{challenge.expected_layout()}"
            )
        skipped = list(skipped) + [(cid, "; ".join(p)) for cid, p in bad]
        dj = build_dataset_json(
            challenge, writer.target.name.split("_", 1)[1], source, done, skipped, options
        )
        folder = writer.finish(dj)
    except BaseException:
        writer.abort()
        raise
    converted = {
        split: [c.case_id for c in done if c.split == split]
        for split in ("Tr", "Ts")
        if any(c.split == split for c in done)
    }
    return ConvertResult(folder, converted, skipped)


def build_dataset_json(challenge, name, source, cases, skipped, options) -> dict:
    dj = {
        "name": name,
        "description": f"{challenge.title}, converted by nnunet-ext convert {challenge.name}",
        "reference": challenge.url,
        "channel_names": dict(challenge.channel_names),
        "labels": challenge.output_labels(**options),
        "numTraining": sum(c.split == "Tr" for c in cases),
        "file_ending": FILE_ENDING,
    }
    if challenge.reader_writer:
        dj["overwrite_image_reader_writer"] = challenge.reader_writer
    dj.update(challenge.extra_dataset_json(cases, **options))
    dj[META_KEY] = {
        "challenge": challenge.name,
        "source": str(Path(source).resolve()),
        "converted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": {k: v for k, v in options.items() if v is not None},
        "cases": {c.case_id: {"split": c.split, "original": c.original, **_jsonable(c.extra)} for c in cases},
        "skipped": [{"case": what, "reason": why} for what, why in skipped],
    }
    return dj


def _jsonable(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if not (isinstance(v, list) and v and isinstance(v[0], Path))}


def format_report(challenge: Challenge, result: ConvertResult) -> str:
    n_tr = len(result.converted.get("Tr", []))
    n_ts = len(result.converted.get("Ts", []))
    lines = [f"{challenge.title}: converted {n_tr} training and {n_ts} test cases -> {result.folder}"]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)}:")
        lines += [f"  {what}: {why}" for what, why in result.skipped]
    dataset_id = int(result.folder.name[7:10])
    lines.append(
        f"next: nnUNetv2_plan_and_preprocess -d {dataset_id} -c 3d_fullres --verify_dataset_integrity"
    )
    return "\n".join(lines)


def missing(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if not p.exists()]
