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

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ext.core.datasets import (  # noqa: F401 - the challenge modules import these from here
    FILE_ENDING,
    IMAGE_SUFFIXES,
    LabelVolume,
    RawDatasetWriter,
    bad_label_values,
    geometry_mismatch,
    image_files,
    incomplete_image,
    is_image_file,
    raw_root,
    read_label_array,
    read_label_pair,
    read_label_volume,
    strip_suffix,
    write_label_like,
)
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import atomic_write_json  # noqa: F401
from nnunet_ext.core.progress import progress as progress_bar

META_KEY = "nnunet_ext_challenge"
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
            from nnunet_ext.core.metrics import normalized_surface_dice

            value = normalized_surface_dice(pred, gt, spacing, tolerance)
        else:
            if distances is None:
                from nnunet_ext.core.metrics import distance_metrics

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
        for case in progress_bar(cases, f"convert {challenge.name} -> {writer.target.name}", progress):
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
