"""``nnunet-ext tasks merge``: several nnU-Net raw datasets -> one partially labelled dataset with a task registry.

Each source dataset becomes one task. Its cases are copied with the task prefix (``liver_`` + case id), its
labels are remapped into one unified label space, and dataset.json gets the task registry
(``nnunet_ext_tasks``) that DoDNet / TransDoDNet / UniSeg read (see docs/task-registry.md, docs/dodnet.md).

Rules: the sources are only read (never modified); channels (number and modality names) and the file
ending must agree; every foreground label of a source must be mapped to a unified label or explicitly dropped
(``null``: it becomes background); the result is written into a temporary folder beside the target and
renamed at the end; an existing dataset with the same id is refused unless ``--force``.

The MOTS preset (``--preset mots``) maps the seven MOTS datasets as DoDNet does: organ and tumour for liver,
kidney, pancreas (registry ``"nested": true``: the organ's target is organ + tumour, as DoDNet's ``label >= 1``);
hepatic vessel = vessel + tumour (not nested, as in DoDNet); colon and lung: tumour only; spleen: organ only.
A spec task may set ``"nested": true`` (see docs/task-registry.md).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ext.core.datasets import RawDatasetWriter, check_dataset_id_and_name, geometry_mismatch
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import read_json
from nnunet_ext.core.paths import resolve_dataset_folder
from nnunet_ext.multitask.tasks import TASKS_KEY, load_task_registry

__all__ = [
    "MOTS_PRESET",
    "PRESETS",
    "MergeTask",
    "MergePlan",
    "plan_merge",
    "merge_datasets",
    "add_merge_parser",
]

#: DoDNet's task order and label mapping (source label VALUE -> unified label name). Sources: LiTS / MSD Task03
#: liver (1 liver, 2 tumour), KiTS19 (1 kidney, 2 tumour), MSD Task08 hepatic vessel (1 vessel, 2 tumour),
#: MSD Task07 pancreas (1 pancreas, 2 tumour), MSD Task10 colon (1 tumour), MSD Task06 lung (1 tumour),
#: MSD Task09 spleen (1 spleen).
MOTS_PRESET: dict = {
    "name": "MOTS",
    "tasks": {
        "liver": {"labels": {"1": "liver", "2": "liver_tumour"}, "nested": True},
        "kidney": {"labels": {"1": "kidney", "2": "kidney_tumour"}, "nested": True},
        "hepaticvessel": {"labels": {"1": "hepatic_vessel", "2": "hepatic_vessel_tumour"}},
        "pancreas": {"labels": {"1": "pancreas", "2": "pancreas_tumour"}, "nested": True},
        "colon": {"labels": {"1": "colon_tumour"}},
        "lung": {"labels": {"1": "lung_tumour"}},
        "spleen": {"labels": {"1": "spleen"}},
    },
}
PRESETS = {"mots": MOTS_PRESET}
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class MergeTask:
    name: str
    source: Path
    prefix: str
    label_map: dict[int, str | None]  # source value -> unified name (None: background)
    dataset_json: dict
    cases: list[str] = field(default_factory=list)
    test_cases: list[str] = field(default_factory=list)
    nested: bool = False  # registry "nested": the organ's target covers its tumour (DoDNet: label >= 1)


@dataclass
class MergePlan:
    tasks: list[MergeTask]
    labels: dict[str, int]  # unified labels incl. background (and ignore)
    channel_names: dict
    file_ending: str
    reader_writer: str | None

    def lut(self, task: MergeTask) -> np.ndarray:
        """Lookup table source value -> unified value."""
        src = _int_labels(task.dataset_json, task.source)
        size = max(src.values()) + 1
        lut = np.zeros(size, dtype=np.int64)
        for value, name in task.label_map.items():
            lut[value] = 0 if name is None else self.labels[name]
        return lut


def _int_labels(dataset_json: Mapping, where) -> dict[str, int]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise UserError(f"{where}: dataset.json has no 'labels'; it is not an nnU-Net raw dataset.")
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise UserError(
                f"{where}: label {name!r} is a region ({value}); merging needs integer labels. Merge the dataset "
                f"before converting it to regions."
            )
        out[str(name)] = int(value)
    return out


def _read_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    if not path.is_file():
        raise UserError(f"{folder} has no dataset.json; pass nnU-Net raw dataset folders (or ids / names).")
    return read_json(
        path, "the source's", "fix the source dataset's dataset.json (the merge never changes it)"
    )


def _case_ids(folder: Path, sub: str, ending: str) -> list[str]:
    d = folder / sub
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(ending)] for p in d.iterdir() if p.name.endswith(ending))


def _image_ids(folder: Path, sub: str, ending: str) -> list[str]:
    d = folder / sub
    if not d.is_dir():
        return []
    return sorted({p.name[: -len(ending) - 5] for p in d.iterdir() if p.name.endswith(ending)})


def _norm_channels(channels: Mapping) -> list[str]:
    return [str(channels[k]).strip().lower() for k in sorted(channels, key=int)]


def plan_merge(spec: Mapping, sources: Mapping[str, str] | None = None) -> MergePlan:
    """Check a merge spec (``{"tasks": {task: {"source", "labels": {src: unified|None}, "prefix"?}},
    "labels"?: [unified order]}``) against its sources; raise :class:`UserError` naming every conflict."""
    sources = dict(sources or {})
    tasks_spec = spec.get("tasks")
    if not isinstance(tasks_spec, Mapping) or not tasks_spec:
        raise UserError(
            'the merge spec needs "tasks": {TASK: {"source": DATASET, "labels": {SRC: UNIFIED}}}.'
        )
    unknown = sorted(set(sources) - set(tasks_spec))
    if unknown:
        raise UserError(
            f"--source names task(s) {unknown} that the spec/preset does not have: {list(tasks_spec)}."
        )
    tasks: list[MergeTask] = []
    order: list[str] = []
    for name, entry in tasks_spec.items():
        source = sources.get(name, entry.get("source"))
        if not source:
            raise UserError(
                f"task {name!r} has no source dataset; pass --source {name}=DATASET (id, name or folder)."
            )
        folder = resolve_dataset_folder(str(source))
        dj = _read_json(folder)
        if "dataset" in dj:
            raise UserError(
                f"{folder}: dataset.json lists its files explicitly ('dataset' key); merging needs the standard "
                f"imagesTr/labelsTr layout."
            )
        src_labels = _int_labels(dj, folder)
        by_value = {v: n for n, v in src_labels.items()}
        ignore = src_labels.get("ignore")
        raw_map = entry.get("labels")
        if not isinstance(raw_map, Mapping) or not raw_map:
            raise UserError(
                f'task {name!r}: "labels" must map source labels to unified names, e.g. {{"1": "liver"}}.'
            )
        label_map: dict[int, str | None] = {}
        for key, target in raw_map.items():
            key = str(key)
            if key.lstrip("-").isdigit():
                value = int(key)
                if value not in by_value:
                    raise UserError(
                        f"task {name!r}: source label value {value} is not in {folder.name}'s labels {src_labels}."
                    )
            elif key in src_labels:
                value = src_labels[key]
            else:
                raise UserError(
                    f"task {name!r}: source label {key!r} is not in {folder.name}'s labels {src_labels}."
                )
            if value == 0 or value == ignore:
                raise UserError(f"task {name!r}: background / ignore ({key}) cannot be remapped; remove it.")
            if target is not None and (
                not isinstance(target, str) or target in ("background", "ignore") or not target
            ):
                raise UserError(
                    f"task {name!r}: {key} -> {target!r}: unified labels are non-empty names other than "
                    f"background/ignore (or null to drop the label)."
                )
            if value in label_map:
                raise UserError(f"task {name!r}: source label {key} is mapped twice.")
            label_map[value] = target
            if target is not None and target not in order:
                order.append(target)
        unmapped = sorted(n for n, v in src_labels.items() if v not in label_map and v != 0 and v != ignore)
        if unmapped:
            raise UserError(
                f"task {name!r}: source labels {unmapped} of {folder.name} are not mapped. Map each to a unified "
                f"label or to null (dropped: becomes background), so that nothing is merged by accident."
            )
        if ignore is not None:
            label_map[ignore] = "ignore"
        ending = dj.get("file_ending")
        if not ending:
            raise UserError(f"{folder}: dataset.json has no file_ending.")
        cases = _case_ids(folder, "labelsTr", ending)
        if not cases:
            raise UserError(f"{folder} has no training labels in labelsTr/*{ending}.")
        images = set(_image_ids(folder, "imagesTr", ending))
        missing = [c for c in cases if c not in images]
        if missing:
            raise UserError(f"{folder}: cases {missing[:5]} have a label but no image in imagesTr.")
        prefix = entry.get("prefix", f"{name}_")
        tasks.append(
            MergeTask(
                name,
                folder,
                prefix,
                label_map,
                dj,
                cases,
                _image_ids(folder, "imagesTs", ending),
                bool(entry.get("nested", False)),
            )
        )

    # sources must agree on channels, file ending and reader
    first = tasks[0]
    for key, describe in (
        ("channel_names", lambda d: _norm_channels(d.get("channel_names", d.get("modality", {})))),
        ("file_ending", lambda d: d.get("file_ending")),
        ("overwrite_image_reader_writer", lambda d: d.get("overwrite_image_reader_writer")),
    ):
        values = {t.name: describe(t.dataset_json) for t in tasks}
        if len({json.dumps(v) for v in values.values()}) > 1:
            raise UserError(
                f"the sources disagree on {key}: {values}. Convert them to the same channels/modalities (same "
                f"number and order) and file format before merging."
            )
    if first.dataset_json.get("file_ending") not in _IMAGE_ENDINGS:
        raise UserError(
            f"file ending {first.dataset_json.get('file_ending')} is not supported; use one of {_IMAGE_ENDINGS}."
        )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be unique: {names}")

    wanted = spec.get("labels")
    if wanted is not None:
        missing = [n for n in order if n not in wanted]
        extra = [n for n in wanted if n not in order]
        if missing or extra:
            raise UserError(
                f'"labels" order must list exactly the unified labels; missing {missing}, unused {extra}.'
            )
        order = list(wanted)
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(order)}}
    if any(t.label_map.get(t.dataset_json["labels"].get("ignore", -1)) == "ignore" for t in tasks):
        labels["ignore"] = len(labels)
    plan = MergePlan(
        tasks,
        labels,
        dict(first.dataset_json.get("channel_names", first.dataset_json.get("modality", {}))),
        first.dataset_json["file_ending"],
        first.dataset_json.get("overwrite_image_reader_writer"),
    )
    load_task_registry(_dataset_json(plan), [t.prefix + c for t in tasks for c in t.cases])
    return plan


def _dataset_json(plan: MergePlan, name: str = "Merged") -> dict:
    dj = {
        "name": name,
        "channel_names": plan.channel_names,
        "labels": plan.labels,
        "numTraining": sum(len(t.cases) for t in plan.tasks),
        "file_ending": plan.file_ending,
        TASKS_KEY: {
            t.name: {
                "prefixes": [t.prefix],
                "labels": sorted(
                    {n for n in t.label_map.values() if n not in (None, "ignore")}, key=plan.labels.get
                ),
                **({"nested": True} if t.nested else {}),
            }
            for t in plan.tasks
        },
        "nnunet_ext_merge": {
            t.name: {
                "source": str(t.source),
                "labels": {str(v): n for v, n in sorted(t.label_map.items())},
                "training_cases": len(t.cases),
                "test_cases": len(t.test_cases),
            }
            for t in plan.tasks
        },
    }
    if plan.reader_writer:
        dj["overwrite_image_reader_writer"] = plan.reader_writer
    return dj


def _remap_label(src: Path, dst: Path, lut: np.ndarray, declared: set[int]) -> list:
    """Write ``src`` with its values mapped through ``lut`` to ``dst``; return the values of ``src`` that its
    dataset.json does not declare (then nothing is written: such voxels must not silently become background)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(src))
    arr = sitk.GetArrayViewFromImage(image)
    bad = [v.item() for v in np.unique(arr) if v != np.round(v) or int(v) not in declared]
    if bad:
        return bad
    out = sitk.GetImageFromArray(lut[arr.astype(np.int64)].astype(np.uint8 if lut.max() < 256 else np.uint16))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(dst), True)
    return []


def merge_datasets(
    spec: Mapping,
    out_root: str | os.PathLike,
    dataset_id: int,
    name: str | None = None,
    sources: Mapping[str, str] | None = None,
    force: bool = False,
    symlink_images: bool = False,
    progress: bool = False,
) -> tuple[Path, MergePlan]:
    """Write ``out_root/Dataset{id:03d}_{name}``; return its path and the checked plan."""
    name = name or spec.get("name") or "Merged"
    check_dataset_id_and_name(dataset_id, name)
    plan = plan_merge(spec, sources)
    n_channels = len(plan.channel_names)
    target = write_merged_dataset(
        plan,
        _dataset_json(plan, name),
        out_root,
        dataset_id,
        name,
        force,
        channels=lambda task: n_channels,
        symlink_images=symlink_images,
        progress=progress,
    )
    return target, plan


def write_merged_dataset(
    plan: MergePlan,
    dataset_json: dict,
    out_root: str | os.PathLike,
    dataset_id: int,
    name: str,
    force: bool,
    channels,
    pad_to: int | None = None,
    symlink_images: bool = False,
    progress: bool = False,
) -> Path:
    """Write the checked ``plan`` as ``out_root/Dataset{id:03d}_{name}`` through :class:`RawDatasetWriter`: each
    task's cases with its prefix, labels remapped to the unified values. ``channels(task)``: the task's image
    channels; ``pad_to``: channels up to this count are written as zero images on channel 0's grid (``uniseg
    merge``'s channel policy; None: every task must have ``channels(task)`` of them, ``tasks merge``). Every
    problem of every source (label values the source does not declare, label geometry differing from an image,
    unreadable labels) is collected and refused together; nothing is written then, and the sources are never
    modified."""
    ending = plan.file_ending
    problems: list[str] = []
    protected = [t.source for t in plan.tasks]
    with RawDatasetWriter(out_root, int(dataset_id), name, force, protected=protected) as writer:
        for task in plan.tasks:
            lut = plan.lut(task)
            n_ch = int(channels(task))
            declared = set(_int_labels(task.dataset_json, task.source).values())
            for sub_img, sub_lab, cases in (
                ("imagesTr", "labelsTr", task.cases),
                ("imagesTs", "labelsTs", task.test_cases),
            ):
                for case in cases:
                    new = task.prefix + case
                    for c in range(n_ch):
                        src = task.source / sub_img / f"{case}_{c:04d}{ending}"
                        if not src.is_file():
                            raise UserError(
                                f"task {task.name!r}: {src} is missing ({n_ch} channel(s) expected)."
                            )
                        how = "symlink" if symlink_images else "copy"
                        writer.add_file(src, sub_img, f"{new}_{c:04d}{ending}", how)
                    if pad_to is not None and n_ch < pad_to:  # absent modalities: zero images
                        _write_zero_channels(writer, task.source / sub_img / f"{case}_0000{ending}",
                                             sub_img, new, ending, range(n_ch, pad_to))  # fmt: skip
                    lab = task.source / sub_lab / f"{case}{ending}"
                    if lab.is_file():
                        where = f"task {task.name!r} {sub_lab}/{lab.name}"
                        problem = _label_problem(task, sub_img, case, lab, n_ch, ending)
                        if problem:
                            problems.append(f"{where}: {problem}")
                            if problem.startswith("cannot read"):  # nothing to remap
                                continue
                        try:
                            bad = _remap_label(lab, writer.path(sub_lab, f"{new}{ending}"), lut, declared)
                        except RuntimeError as e:  # SimpleITK cannot read the voxels (truncated / corrupt)
                            reason = (str(e).strip().splitlines() or [""])[-1][:200]
                            problems.append(f"{where}: unreadable ({reason})")
                            continue
                        if bad:  # undeclared values must not silently become background
                            problems.append(
                                f"{where}: label values {bad} that its dataset.json does not declare "
                                f"({sorted(declared)})"
                            )
                if progress and cases:
                    print(f"  {task.name}: {len(cases)} case(s) from {task.source / sub_img}", flush=True)
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise UserError(
                f"{len(problems)} problem(s) in the sources (nothing was written): "
                + "; ".join(shown)
                + ". Declare every label value in the source's dataset.json (or fix the label files), and give "
                "images and labels the same geometry; the sources are never modified."
            )
        return writer.finish(dataset_json)  # the old dataset goes only once the new one is in place


def _label_problem(task, sub_img: str, case: str, lab: Path, n_ch: int, ending: str) -> str | None:
    """None if the label file lies on the grid of every image channel of the case; else what differs (one
    problem per label file)."""
    for c in range(n_ch):
        image = task.source / sub_img / f"{case}_{c:04d}{ending}"
        diff = geometry_mismatch(image, lab)
        if diff:
            return diff if diff.startswith("cannot read") else f"geometry differs from {image.name}: {diff}"
    return None


def _write_zero_channels(writer, reference: Path, sub: str, case: str, ending: str, channels) -> None:
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(reference))
    zero = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    zero.CopyInformation(ref)
    for c in channels:
        dst = writer.path(sub, f"{case}_{c:04d}{ending}")
        sitk.WriteImage(zero, str(dst), True)


def format_report(target: Path, plan: MergePlan) -> str:
    lines = [f"wrote {target}", f"  channels {plan.channel_names}, file ending {plan.file_ending}"]
    lines.append("  unified labels: " + ", ".join(f"{n} {v}" for n, v in plan.labels.items()))
    for t in plan.tasks:
        src = {v: n for n, v in _int_labels(t.dataset_json, t.source).items()}
        mapping = ", ".join(
            f"{src.get(v, v)}({v}) -> {n if n is not None else 'background (dropped)'}"
            for v, n in sorted(t.label_map.items())
        )
        lines.append(
            f"  task {t.name}: {len(t.cases)} training + {len(t.test_cases)} test case(s) from {t.source}, "
            f"prefix {t.prefix!r}; {mapping}"
        )
    lines.append("  sources were only read; task registry written to dataset.json['nnunet_ext_tasks']")
    lines.append(
        f"next: nnUNetv2_plan_and_preprocess -d {int(target.name[7:10])} --verify_dataset_integrity -c 3d_fullres"
    )
    return "\n".join(lines)


def _parse_pairs(values, what: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise UserError(f"{what} expects TASK=VALUE, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def spec_and_sources_from_args(
    args: argparse.Namespace, presets: dict | None = None
) -> tuple[dict, dict, str]:
    """(merge spec, {task: source dataset}, output raw folder) from ``--preset`` (if ``presets``) / ``--spec`` /
    ``--map`` + ``--source`` / ``--out``: the arguments ``tasks merge`` and ``uniseg merge`` share."""
    sources = _parse_pairs(args.source, "--source")
    preset = getattr(args, "preset", None) if presets else None
    if preset and args.spec:
        raise UserError("give either --preset or --spec, not both.")
    if preset:
        spec = json.loads(json.dumps(presets[preset]))
    elif args.spec:
        spec = read_json(
            args.spec, "the merge spec", 'write {"tasks": {TASK: {"source": ..., "labels": ...}}}'
        )
    else:
        if not args.map:
            raise UserError(
                "say how labels map: "
                + ("--preset mots, " if presets else "")
                + "--spec FILE, or --map TASK:SRC=UNIFIED[,SRC=UNIFIED] per task together with --source TASK=DATASET."
            )
        spec = {"tasks": {}}
        for item in args.map:
            if ":" not in item:
                raise UserError(f"--map expects TASK:SRC=UNIFIED[,SRC=UNIFIED], got {item!r}.")
            task, pairs = item.split(":", 1)
            labels = {}
            for pair in pairs.split(","):
                if "=" not in pair:
                    raise UserError(f"--map {item!r}: {pair!r} is not SRC=UNIFIED.")
                s, u = pair.split("=", 1)
                labels[s.strip()] = None if u.strip().lower() in ("", "none", "null", "-") else u.strip()
            spec["tasks"][task.strip()] = {"labels": labels}
        missing = sorted(set(sources) - set(spec["tasks"]))
        if missing:
            raise UserError(f"--source given for {missing} without a --map for them.")
    out = args.out or os.environ.get("nnUNet_raw")
    if not out:
        raise UserError("no output folder: set nnUNet_raw or pass --out DIR.")
    return spec, sources, out


def _cmd_merge(args: argparse.Namespace) -> int:
    spec, sources, out = spec_and_sources_from_args(args, PRESETS)
    target, plan = merge_datasets(
        spec,
        out,
        args.id,
        args.name,
        sources,
        force=args.force,
        symlink_images=args.symlink_images,
        progress=True,
    )
    print(format_report(target, plan))
    return 0


def add_merge_arguments(p: argparse.ArgumentParser, default_name: str, presets: bool) -> None:
    """The arguments ``tasks merge`` and ``uniseg merge`` share: target id and name, the task spec (``--spec``,
    or ``--source``/``--map``, or a shipped ``--preset`` where ``presets``), the raw folder and ``--force``."""
    p.add_argument("-d", "--id", type=int, required=True, help="id of the merged dataset")
    p.add_argument("--name", default=None, help=f"name of the merged dataset (default: {default_name})")
    if presets:
        p.add_argument(
            "--preset", choices=sorted(PRESETS), help="a shipped label mapping (mots: DoDNet's 7 tasks)"
        )
    p.add_argument(
        "--spec", help='JSON: {"tasks": {TASK: {"source": DATASET, "labels": {SRC: UNIFIED|null}}}}'
    )
    p.add_argument(
        "--source", action="append", metavar="TASK=DATASET", help="source dataset of a task (repeat)"
    )
    p.add_argument(
        "--map", action="append", metavar="TASK:SRC=UNIFIED,...", help="label mapping of a task (repeat)"
    )
    p.add_argument("--out", default=None, help="raw data folder (default $nnUNet_raw)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset with this id")


def add_merge_parser(sub) -> argparse.ArgumentParser:
    """Register ``nnunet-ext tasks merge`` on the ``tasks`` sub-command's subparsers."""
    text = "merge nnU-Net raw datasets into one partially labelled dataset with a task registry"
    p = sub.add_parser(
        "merge", help=text, description=text + " (see docs/dodnet.md). Sources are never modified."
    )
    add_merge_arguments(p, "the preset's/spec's, or Merged", presets=True)
    p.add_argument("--symlink-images", action="store_true", help="symlink images instead of copying them")
    p.set_defaults(func=_cmd_merge)
    return p
