"""Task registry: which cases of a dataset belong to which task, and which labels each task annotates.

Multi-task / partially labelled methods (DoDNet, TransDoDNet, UniSeg, MedSeqFT) need to know, for every
training case, its task and the labels that task annotates. The registry lives in the dataset's
``dataset.json`` under the key ``"nnunet_ext_tasks"``; nnU-Net ignores unknown keys and copies
``dataset.json`` into ``nnUNet_preprocessed`` and the results folders, so the registry travels with the
data and the trained model::

    "nnunet_ext_tasks": {
      "liver":  {"prefixes": ["liver_"],  "labels": ["liver", "liver_tumour"]},
      "kidney": {"prefixes": ["kidney_"], "labels": ["kidney", "kidney_tumour"]}
    }

A case belongs to the task whose prefix its case identifier starts with. The order of the tasks in the file
defines the task index 0..T-1. See docs/task-registry.md.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import read_json
from nnunet_ext.core.paths import resolve_dataset_folder

__all__ = [
    "TASKS_KEY",
    "TaskRegistryError",
    "TaskSpec",
    "TaskRegistry",
    "load_task_registry",
    "load_task_registry_from_folder",
    "case_ids_in_folder",
    "add_registry_parsers",
]

TASKS_KEY = "nnunet_ext_tasks"
DOC = "docs/task-registry.md"
_EXAMPLE = '"nnunet_ext_tasks": {"liver": {"prefixes": ["liver_"], "labels": ["liver", "liver_tumour"]}, ...}'


class TaskRegistryError(UserError):
    """The task registry in dataset.json is missing or invalid (the message says what and how to fix it)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: the case-identifier prefixes that select its cases and the labels it annotates."""

    name: str
    prefixes: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    #: nested structures (DoDNet's organ/tumour): structure j's target is the union of labels j, j+1, ... (the
    #: organ channel covers organ + tumour); False: every structure is its own label value
    nested: bool = False


@dataclass(frozen=True)
class TaskRegistry:
    """The validated registry. ``tasks`` is the ordered tuple of task names (position = task index)."""

    specs: tuple[TaskSpec, ...]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def num_tasks(self) -> int:
        return len(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def spec(self, task: str) -> TaskSpec:
        for s in self.specs:
            if s.name == task:
                return s
        raise TaskRegistryError(
            f"unknown task {task!r}; the registry defines {list(self.tasks)}. Use one of those."
        )

    def task_index(self, name: str) -> int:
        """Index 0..T-1 of task ``name`` (its position in dataset.json)."""
        return self.tasks.index(self.spec(name).name)

    def prefixes_of(self, task: str) -> list[str]:
        return list(self.spec(task).prefixes)

    def task_of(self, case_id: str) -> str:
        """Name of the task whose prefix ``case_id`` starts with."""
        case_id = str(case_id)
        for s in self.specs:
            if any(case_id.startswith(p) for p in s.prefixes):
                return s.name
        known = {s.name: list(s.prefixes) for s in self.specs}
        raise TaskRegistryError(
            f"case {case_id!r} belongs to no task: its identifier starts with none of the task prefixes "
            f"{known}. Rename the case so that it starts with its task's prefix, or add a prefix to that "
            f"task in dataset.json['{TASKS_KEY}'] (see {DOC})."
        )

    def task_id_of(self, case_id: str) -> int:
        return self.task_index(self.task_of(case_id))

    def task_ids_for_keys(self, keys: Iterable[str]) -> list[int]:
        """Task index of every case identifier in a batch's ``keys``."""
        return [self.task_id_of(str(k)) for k in keys]

    def labels_of(self, task: str) -> list[int]:
        """Label values (from dataset.json ``labels``) annotated by ``task``."""
        return list(self.spec(task).labels)

    def label_names_of(self, task: str) -> list[str]:
        return list(self.spec(task).label_names)

    def nested_of(self, task: str) -> bool:
        """Whether ``task``'s structures are nested (structure j = union of its labels j, j+1, ...)."""
        return bool(self.spec(task).nested)

    def cases_by_task(self, case_ids: Iterable[str]) -> dict[str, list[str]]:
        """Group case identifiers by task (every task present, in registry order)."""
        out: dict[str, list[str]] = {t: [] for t in self.tasks}
        for c in case_ids:
            out[self.task_of(c)].append(str(c))
        return out

    def to_json(self) -> dict:
        """The ``dataset.json['nnunet_ext_tasks']`` value (labels by name)."""
        return {
            s.name: {
                "prefixes": list(s.prefixes),
                "labels": list(s.label_names),
                **({"nested": True} if s.nested else {}),
            }
            for s in self.specs
        }


def _plain_labels(labels: Mapping) -> tuple[dict[str, int], dict[str, object]]:
    """name -> int for integer labels; name -> value for region labels (lists/tuples)."""
    ints: dict[str, int] = {}
    regions: dict[str, object] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            regions[str(name)] = value
        else:
            ints[str(name)] = int(value)
    return ints, regions


def load_task_registry(dataset_json: Mapping, case_ids: Sequence[str] | None = None) -> TaskRegistry:
    """Validate ``dataset_json['nnunet_ext_tasks']`` and return the registry.

    If ``case_ids`` (training case identifiers) are given, also check that every case belongs to a task and
    every task has at least one case. Raises :class:`TaskRegistryError` naming the problem and its fix.
    """
    if not isinstance(dataset_json, Mapping):
        raise TaskRegistryError(
            "dataset.json must be a JSON object (a dict); check that the file is a dataset.json."
        )
    if TASKS_KEY not in dataset_json:
        raise TaskRegistryError(
            f"dataset.json has no '{TASKS_KEY}' key, so its cases have no tasks. Add one that maps every task "
            f"to the case-identifier prefixes of its cases and the labels it annotates, e.g. {_EXAMPLE} "
            f"(see {DOC})."
        )
    raw = dataset_json[TASKS_KEY]
    if not isinstance(raw, Mapping):
        raise TaskRegistryError(
            f"dataset.json['{TASKS_KEY}'] must be an object mapping task names to "
            f'{{"prefixes": [...], "labels": [...]}}, not a {type(raw).__name__}; e.g. {_EXAMPLE} (see {DOC}).'
        )
    if len(raw) == 0:
        raise TaskRegistryError(
            f"dataset.json['{TASKS_KEY}'] is empty; declare at least one task, e.g. {_EXAMPLE}."
        )
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise TaskRegistryError(
            "dataset.json has no 'labels' object, so task labels cannot be checked. Add nnU-Net's "
            '"labels": {"background": 0, ...} (see nnU-Net\'s dataset_format.md).'
        )
    try:
        ints, regions = _plain_labels(labels)
    except (TypeError, ValueError) as e:
        raise TaskRegistryError(
            f"dataset.json 'labels' has a non-integer value ({e}); fix 'labels' first."
        ) from e
    value_to_name = {v: k for k, v in ints.items()}
    forbidden = {"background", "ignore"}
    forbidden_values = {0} | ({ints["ignore"]} if "ignore" in ints else set())
    valid = [n for n in ints if n not in forbidden]

    specs: list[TaskSpec] = []
    for task, entry in raw.items():
        where = f"dataset.json['{TASKS_KEY}'][{task!r}]"
        if not isinstance(task, str) or not task.strip():
            raise TaskRegistryError(
                f"task names must be non-empty strings, got {task!r}; rename it in {where}."
            )
        if not isinstance(entry, Mapping):
            raise TaskRegistryError(
                f'{where} must be an object {{"prefixes": [...], "labels": [...]}}, not {type(entry).__name__}.'
            )
        prefixes = entry.get("prefixes")
        if prefixes is None or (isinstance(prefixes, (list, tuple)) and len(prefixes) == 0):
            raise TaskRegistryError(
                f'task {task!r} has no prefixes: add "prefixes": ["{task}_"] (the start of its case '
                f"identifiers) to {where}."
            )
        if not isinstance(prefixes, (list, tuple)) or not all(isinstance(p, str) and p for p in prefixes):
            raise TaskRegistryError(
                f"{where}['prefixes'] must be a list of non-empty strings (e.g. [\"{task}_\"]), got {prefixes!r}."
            )
        task_labels = entry.get("labels")
        if task_labels is None or (isinstance(task_labels, (list, tuple)) and len(task_labels) == 0):
            raise TaskRegistryError(
                f'task {task!r} has no labels: add "labels": [...] with the names of the labels it annotates '
                f"(from dataset.json 'labels': {valid}) to {where}."
            )
        if not isinstance(task_labels, (list, tuple)):
            raise TaskRegistryError(f"{where}['labels'] must be a list of label names, got {task_labels!r}.")
        values: list[int] = []
        names: list[str] = []
        for lab in task_labels:
            if isinstance(lab, bool) or not isinstance(lab, (str, int)):
                raise TaskRegistryError(
                    f"{where}['labels'] entries must be label names (or ints), got {lab!r}."
                )
            if isinstance(lab, int):
                if lab in forbidden_values:
                    raise TaskRegistryError(
                        f"task {task!r} lists label value {lab}, which is background or ignore; those are never "
                        f"listed (background is implicit, ignore is never annotated). Remove it from {where}."
                    )
                if lab not in value_to_name:
                    raise TaskRegistryError(
                        f"task {task!r} lists label value {lab}, which is not in dataset.json 'labels'. Valid "
                        f"labels: {valid} (values {[ints[n] for n in valid]}). Fix {where}['labels']."
                    )
                name = value_to_name[lab]
            else:
                name = lab
                if name in forbidden:
                    raise TaskRegistryError(
                        f"task {task!r} lists {name!r}; background and ignore are never listed (background is "
                        f"implicit, ignore is never annotated). Remove it from {where}['labels']."
                    )
                if name in regions:
                    raise TaskRegistryError(
                        f"task {task!r} lists {name!r}, a region (list of labels) in dataset.json 'labels'; the "
                        f"task registry needs integer labels. List the integer labels instead: {valid}."
                    )
                if name not in ints:
                    raise TaskRegistryError(
                        f"task {task!r} lists label {name!r}, which is not in dataset.json 'labels'. Valid labels: "
                        f"{valid}. Fix {where}['labels'] (names must match exactly)."
                    )
            if name in names:
                raise TaskRegistryError(
                    f"task {task!r} lists label {name!r} twice; remove the duplicate from {where}."
                )
            names.append(name)
            values.append(ints[name])
        nested = entry.get("nested", False)
        if not isinstance(nested, bool):
            raise TaskRegistryError(
                f"{where}['nested'] must be true or false (true: each structure's target also covers the labels "
                f"listed after it, e.g. the organ covers its tumour), got {nested!r}."
            )
        if nested and len(values) < 2:
            raise TaskRegistryError(
                f'task {task!r} is marked "nested" but lists only {names}: nesting needs an outer label and at least '
                f'one inner label listed after it (e.g. ["liver", "liver_tumour"]). Add the inner label or remove '
                f'"nested" from {where}.'
            )
        specs.append(TaskSpec(task, tuple(prefixes), tuple(values), tuple(names), nested))

    # ambiguity: a prefix of one task must not be a prefix of (or equal to) a prefix of another task
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            for pa in a.prefixes:
                for pb in b.prefixes:
                    if pa.startswith(pb) or pb.startswith(pa):
                        raise TaskRegistryError(
                            f"ambiguous prefixes: {pa!r} (task {a.name!r}) and {pb!r} (task {b.name!r}) overlap, so a "
                            f"case starting with {max(pa, pb, key=len)!r} would belong to both tasks. Make the "
                            f'prefixes distinct, e.g. end each with \'_\' ("{a.name}_", "{b.name}_").'
                        )
    registry = TaskRegistry(tuple(specs))

    if case_ids is not None:
        case_ids = [str(c) for c in case_ids]
        orphans = [c for c in case_ids if not any(c.startswith(p) for s in specs for p in s.prefixes)]
        if orphans:
            shown = ", ".join(repr(c) for c in orphans[:10]) + (
                f" (+{len(orphans) - 10} more)" if len(orphans) > 10 else ""
            )
            raise TaskRegistryError(
                f"{len(orphans)} case(s) belong to no task: {shown}. Known prefixes: "
                f"{ {s.name: list(s.prefixes) for s in specs} }. Rename those cases to start with their task's "
                f"prefix or add their prefix to a task in dataset.json['{TASKS_KEY}']."
            )
        by_task = registry.cases_by_task(case_ids)
        empty = [t for t, cs in by_task.items() if not cs]
        if empty:
            raise TaskRegistryError(
                f"task(s) {empty} have no training case (no case identifier starts with "
                f"{[p for t in empty for p in registry.prefixes_of(t)]}). Add cases with that prefix or remove "
                f"the task from dataset.json['{TASKS_KEY}']."
            )
    return registry


def case_ids_in_folder(folder: str | os.PathLike, dataset_json: Mapping | None = None) -> list[str] | None:
    """Training case identifiers of a raw (``labelsTr``) or preprocessed (``gt_segmentations``) dataset
    folder, or those of an explicit ``dataset`` entry in dataset.json; ``None`` if none is found."""
    folder = Path(folder)
    if dataset_json is None:
        dataset_json = _read_dataset_json(folder)
    if isinstance(dataset_json.get("dataset"), Mapping):
        return sorted(str(k) for k in dataset_json["dataset"])
    ending = dataset_json.get("file_ending", ".nii.gz")
    for sub in ("labelsTr", "gt_segmentations"):
        d = folder / sub
        if d.is_dir():
            return sorted(
                p.name[: -len(ending)] for p in d.iterdir() if p.is_file() and p.name.endswith(ending)
            )
    return None


def _read_dataset_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    if not path.is_file():
        raise TaskRegistryError(
            f"no dataset.json in {folder}. Pass an nnU-Net raw or preprocessed dataset folder "
            f"(e.g. $nnUNet_raw/Dataset501_Name), or a dataset id/name."
        )
    try:
        return read_json(path, "the dataset's", "fix the file")
    except UserError as e:
        raise TaskRegistryError(str(e)) from None


def load_task_registry_from_folder(folder: str | os.PathLike) -> TaskRegistry:
    """Load and validate the registry of a raw or preprocessed dataset folder (cases from labelsTr /
    gt_segmentations when present)."""
    folder = Path(folder)
    dataset_json = _read_dataset_json(folder)
    return load_task_registry(dataset_json, case_ids_in_folder(folder, dataset_json))


# ----------------------------------------------------------------------------------------------- CLI


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cmd_show(args: argparse.Namespace) -> int:
    folder = resolve_dataset_folder(args.dataset)
    dataset_json = _read_dataset_json(folder)
    case_ids = case_ids_in_folder(folder, dataset_json)
    registry = load_task_registry(dataset_json, None)  # show even if cases don't match; validate says why
    counts = None
    if case_ids is not None:
        counts = {t: 0 for t in registry.tasks}
        unassigned = 0
        for c in case_ids:
            try:
                counts[registry.task_of(c)] += 1
            except TaskRegistryError:
                unassigned += 1
    rows = [["index", "task", "prefixes", "labels", "cases"]]
    for i, s in enumerate(registry.specs):
        labels = ", ".join(f"{n} ({v})" for n, v in zip(s.label_names, s.labels)) + (
            " [nested]" if s.nested else ""
        )
        rows.append([str(i), s.name, ", ".join(s.prefixes), labels, str(counts[s.name]) if counts else "-"])
    print(f"{folder}: {registry.num_tasks} task(s)")
    print(_format_table(rows))
    if counts is not None and unassigned:
        print(
            f"warning: {unassigned} case(s) belong to no task; run `nnunet-ext tasks validate {args.dataset}`."
        )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    folder = resolve_dataset_folder(args.dataset)
    registry = load_task_registry_from_folder(folder)
    case_ids = case_ids_in_folder(folder)
    cases = f", {len(case_ids)} training case(s)" if case_ids is not None else " (no training cases found)"
    print(f"{folder}: task registry OK: {registry.num_tasks} task(s) {list(registry.tasks)}{cases}")
    return 0


def add_registry_parsers(sub) -> None:
    """Register ``show`` and ``validate`` on the ``tasks`` command's subparsers
    (:mod:`nnunet_ext.multitask.cli` builds the command)."""
    for name, func, text in (
        ("show", _cmd_show, "print each task's prefixes, labels and number of training cases"),
        (
            "validate",
            _cmd_validate,
            "check the registry (and that cases and tasks match); exit 1 with the error",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("dataset", metavar="DATASET", help="dataset id, name (Dataset501_X) or folder path")
        p.set_defaults(func=func)
