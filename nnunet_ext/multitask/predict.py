"""Multi-task inference commands: ``nnunet-ext predict`` (DoDNet / TransDoDNet / UniSeg: all tasks merged, one
task, each case's own task, or one label map per task) and ``nnunet-ext postprocess`` (DoDNet-style
connected-component clean-up). See docs/dodnet.md and docs/uniseg.md.

``nnunet-ext predict`` decodes exactly: the network's ``task_scores`` (per (task, structure) probabilities: DoDNet
sigmoids, UniSeg per-task softmaxes; every task from one backbone pass) go through nnU-Net's own sliding window,
mirroring and fold averaging, are resampled to the original grid like nnU-Net's logits, and only then does every
task decide (DoDNet: threshold 0.5, the later structure of the task wins; UniSeg: argmax) and the cross-task rule
merge (:func:`nnunet_ext.multitask.partial_labels.merge_task_decisions`, weighted by the own-task validation Dice stored in the
checkpoint). ``--per-task`` writes ``OUT/<task>/CASE`` for every task (overlapping structures all kept). The stock
``nnUNetv2_predict`` averages the networks' merge logits instead (an approximation, documented).

The same functions give the own-task end-of-training validation (:class:`nnunet_ext.multitask.trainer.TaskRegistryTrainerMixin`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.nnunet_commands import device_arg, fold_arg

__all__ = [
    "load_predictor",
    "predict_tasks",
    "postprocess_segmentation",
    "default_postprocessing_rules",
    "add_parser",
]


def _task_score_network_class():
    from torch import nn

    class TaskScoreNetwork(nn.Module):
        """What nnU-Net's predictor calls as ``network(x)`` for exact multi-task decoding: ``net.task_scores(x,
        tasks)``, the per-(task, structure) probabilities (DoDNet: sigmoid per structure; UniSeg: each task's
        softmax), which the predictor averages over mirrors, windows and folds. Weights load into the wrapped
        network (the predictor loads every fold's parameters)."""

        def __init__(self, net, tasks=None):
            super().__init__()
            self.net = net
            self.tasks = None if tasks is None else [int(t) for t in tasks]

        def forward(self, x):
            return self.net.task_scores(x, self.tasks)

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    return TaskScoreNetwork


def restrict_tasks(net, tasks=None):
    """A module whose ``forward(x)`` is ``net.task_scores(x, tasks)`` (torch imported lazily)."""
    return _task_score_network_class()(net, tasks)


def num_score_channels(net) -> int:
    """T * K: channels of ``net.task_scores`` (DoDNet: structures per task; UniSeg: classes per task)."""
    return int(net.num_tasks * (net.num_outputs if hasattr(net, "forward_global") else net.num_structures))


def predict_task_scores(predictor, data, tasks=None):
    """Per-(task, structure) probabilities (T*K, *spatial) of a preprocessed case (C, *spatial), averaged over
    mirrors, windows and (with loaded fold parameters) folds, by nnU-Net's own sliding-window code."""
    from types import SimpleNamespace

    network, label_manager = predictor.network, predictor.label_manager
    from nnunet_ext.core.train_step import unwrap

    net = unwrap(network)
    predictor.network = restrict_tasks(net, tasks)
    # the predictor sizes its accumulator from label_manager.num_segmentation_heads
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=num_score_channels(net))
    try:
        if getattr(predictor, "list_of_parameters", None):
            scores = predictor.predict_logits_from_preprocessed_data(data)
        else:  # the trainer's validation predictor: the network's current weights
            scores = predictor.predict_sliding_window_return_logits(data)
    finally:
        predictor.network, predictor.label_manager = network, label_manager
    return scores.float().cpu()


def scores_to_original_shape(scores, properties: dict, plans_manager, configuration_manager):
    """Resample (T*K, *preprocessed) scores to the cropped original grid (as nnU-Net does with its logits)."""
    import torch

    spacing_t = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = (
        configuration_manager.spacing
        if len(configuration_manager.spacing) == len(shape)
        else [spacing_t[0], *configuration_manager.spacing]
    )
    out = configuration_manager.resampling_fn_probabilities(scores, shape, current, spacing_t)
    return torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out).float()


def stored_merge_weights(predictor):
    """(T, K) cross-task weights averaged over the loaded folds, and whether every fold had stored ones."""
    import torch

    from nnunet_ext.core.train_step import unwrap
    from nnunet_ext.multitask.partial_labels import MERGE_WEIGHTS, MERGE_WEIGHTS_SET

    net = unwrap(predictor.network)
    params = getattr(predictor, "list_of_parameters", None) or [net.state_dict()]
    ws, ok = [], True
    for p in params:
        key = next((k for k in p if k.endswith(MERGE_WEIGHTS)), None)
        flag = next((k for k in p if k.endswith(MERGE_WEIGHTS_SET)), None)
        if key is None or flag is None or float(p[flag]) <= 0:
            ok = False
        if key is not None:
            ws.append(p[key].float().cpu())
    if not ws:
        return None, False
    return torch.stack(ws).mean(0), ok


def decode_scores(net, scores, mode: str, task: int | None = None, weights=None):
    """Label map (global label values, *spatial) from averaged scores (T*K, *spatial).

    ``mode="own"``: task ``task``'s own decision (DoDNet: threshold 0.5, the later structure of the task wins;
    UniSeg: argmax over the task's classes). ``mode="merged"``: every task decides first, then the cross-task
    rule (:func:`nnunet_ext.multitask.partial_labels.merge_task_decisions`) with ``weights`` (T, K)."""
    import torch

    from nnunet_ext.multitask.partial_labels import merge_task_decisions, own_task_labels

    choice, margin = net.decide_tasks(scores.unsqueeze(0))  # (1, T, ...)
    table = net.structure_labels.cpu()
    if mode == "own":
        return own_task_labels(choice[0, int(task)], table, int(task))
    if weights is None:
        weights = torch.ones(table.shape, dtype=torch.float32)
    return merge_task_decisions(choice, margin, table, weights)[0]


def write_label_map(seg, properties: dict, plans_manager, file_truncated: str, file_ending: str) -> None:
    """Put a label map on the cropped original grid back into the full image (nnU-Net's export steps: revert
    cropping and transposition) and write it atomically."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    seg = np.asarray(seg.cpu().numpy() if hasattr(seg, "cpu") else seg)
    dtype = np.uint8 if seg.max(initial=0) < 255 else np.uint16
    full = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    full = insert_crop_into_image(full, seg.astype(dtype), properties["bbox_used_for_cropping"])
    full = full.transpose(plans_manager.transpose_backward)
    rw = plans_manager.image_reader_writer_class()
    folder, name = os.path.split(file_truncated)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}{file_ending}")
    try:
        rw.write_seg(full, tmp, properties)
        os.replace(tmp, file_truncated + file_ending)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_predictor(model_folder, folds, checkpoint="checkpoint_final.pth", device="auto", tta=True, step=0.5):
    """nnU-Net's predictor for a DoDNet / TransDoDNet / UniSeg model folder; returns (predictor, layout)."""
    from nnunet_ext.core.inference import predictor_from_model_folder
    from nnunet_ext.core.train_step import unwrap
    from nnunet_ext.multitask.partial_labels import LAYOUT_KEY, TaskLayout

    predictor = predictor_from_model_folder(model_folder, folds, checkpoint, device, tta=tta, step=step)

    net = unwrap(predictor.network)
    multi_task = hasattr(net, "set_inference_tasks") or hasattr(net, "forward_global")
    if not multi_task or LAYOUT_KEY not in predictor.plans_manager.plans:
        raise UserError(
            f"{model_folder} is not a DoDNet / TransDoDNet / UniSeg model (trainer {predictor.trainer_name}); "
            f"single-task prediction needs a model trained with nnUNetTrainerDoDNet, nnUNetTrainerTransDoDNet "
            f"or nnUNetTrainerUniSeg."
        )
    return predictor, TaskLayout.from_json(predictor.plans_manager.plans[LAYOUT_KEY])


def predict_tasks(
    predictor,
    layout,
    input_folder,
    output_folder,
    tasks: Sequence[str] | None = None,
    by_prefix: bool = False,
    per_task: bool = False,
    equal_weights: bool = False,
    overwrite: bool = False,
) -> dict[str, str]:
    """Predict every case of ``input_folder`` (nnU-Net raw image layout) into ``output_folder`` with exact
    multi-task decoding (the per-(task, structure) probabilities are averaged over mirrors, windows and folds
    first, then every task decides - DoDNet: threshold 0.5, tumour over organ; UniSeg: argmax - then the
    cross-task rule merges; see docs/dodnet.md).

    Modes: all tasks merged (default); ``tasks`` only (merged over those; one task = its own map); ``by_prefix``:
    each case with its own task; ``per_task``: one label map per task (``tasks`` or all) into
    ``output_folder/<task>/`` with nnU-Net's file names, so structures of different tasks that overlap are all
    kept. The merge needs the cross-task weights stored by validation unless ``equal_weights``. Returns
    case -> mode."""
    import torch
    from nnunetv2.utilities.utils import (
        create_lists_from_splitted_dataset_folder,
        get_identifiers_from_splitted_dataset_folder,
    )

    from nnunet_ext.core.io import atomic_write_json
    from nnunet_ext.multitask.tasks import TASKS_KEY, load_task_registry

    if by_prefix and (tasks or per_task):
        raise UserError(
            "--by-prefix gives every case its own task; do not combine it with --task or --per-task."
        )
    from nnunet_ext.core.train_step import unwrap

    net = unwrap(predictor.network)
    ending = predictor.dataset_json["file_ending"]
    cases = [str(c) for c in get_identifiers_from_splitted_dataset_folder(str(input_folder), ending)]
    if not cases:
        raise UserError(f"no images *_0000{ending} in {input_folder}.")
    indices = None if not tasks else [layout.task_index(t) for t in tasks]
    task_of_case: dict[str, int] = {}
    if by_prefix:
        if TASKS_KEY not in predictor.dataset_json:
            raise UserError(
                "--by-prefix needs a model trained on a dataset with a task registry; use --task instead."
            )
        registry = load_task_registry(predictor.dataset_json)
        unknown = [c for c in cases if not any(c.startswith(p) for s in registry.specs for p in s.prefixes)]
        if unknown:
            raise UserError(
                f"case(s) {unknown[:5]} start with no task prefix { {s.name: list(s.prefixes) for s in registry.specs} }; "
                f"rename them, or predict them with --task TASK or universally (no --by-prefix)."
            )
        task_of_case = {c: layout.task_index(registry.task_of(c)) for c in cases}
    out = Path(output_folder)
    per_task_names = list(tasks) if tasks else list(layout.tasks)
    if per_task:
        existing = [str(out / t) for t in per_task_names if (out / t).exists()]
        if existing and not overwrite:
            raise UserError(
                f"--per-task output folder(s) {existing} already exist; pass another -o, remove them, or add "
                f"--overwrite."
            )
    merging = (
        not per_task and not by_prefix and (indices is None or len(indices) > 1) and layout.num_tasks > 1
    )
    weights, stored = stored_merge_weights(predictor)
    if merging and not stored and not equal_weights:
        raise UserError(
            "this model has no stored cross-task merge weights (its checkpoints predate them or its validation "
            "never ran); run `nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER --val` for every fold used, "
            "or pass --equal-weights (or --per-task / --by-prefix, which need no merge)."
        )
    if equal_weights or weights is None:
        weights = torch.ones(net.structure_labels.shape, dtype=torch.float32)

    plans_manager, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    lists = create_lists_from_splitted_dataset_folder(str(input_folder), ending, cases)
    folders = [out / t for t in per_task_names] if per_task else [out]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for case, files in zip(cases, lists):
        data, _, props = preprocessor.run_case(files, None, plans_manager, cm, predictor.dataset_json)
        if by_prefix:
            sel = [task_of_case[case]]
        else:
            sel = indices
        scores = predict_task_scores(predictor, torch.from_numpy(np.asarray(data)), sel)
        scores = scores_to_original_shape(scores, props, plans_manager, cm)
        if per_task:
            for name in per_task_names:
                seg = decode_scores(net, scores, "own", layout.task_index(name))
                write_label_map(seg, props, plans_manager, str(out / name / case), ending)
            done[case] = "per-task"
        elif by_prefix or (indices is not None and len(indices) == 1):
            t = sel[0]
            write_label_map(
                decode_scores(net, scores, "own", t), props, plans_manager, str(out / case), ending
            )
            done[case] = layout.tasks[t]
        else:
            seg = decode_scores(net, scores, "merged", weights=weights)
            write_label_map(seg, props, plans_manager, str(out / case), ending)
            done[case] = "universal" if indices is None else "+".join(tasks)
    record = {
        "tasks": list(layout.tasks),
        "cases": done,
        "merge_weights": None if not merging else weights.tolist(),
        "merge_weights_stored": bool(stored) and not equal_weights,
    }
    for f in folders:
        atomic_write_json(f / "dataset.json", predictor.dataset_json)
        atomic_write_json(f / "plans.json", plans_manager.plans)
        atomic_write_json(f / "nnunet_ext_predict.json", record)
    return done


# ---------------------------------------------------------------------------------------------- post-processing
def default_postprocessing_rules(dataset_json: dict) -> dict:
    """DoDNet-style rules from the task registry: per task with several labels, the first is the organ (largest
    connected component of organ + its inner labels; 2 for a kidney) and the others must lie inside it; a
    single-label task keeps its largest component unless its name says tumour/cancer/lesion. Every label drops
    components below ``min_size`` voxels."""
    from nnunet_ext.multitask.partial_labels import TaskLayout

    layout, registry = TaskLayout.from_dataset_json(dataset_json)
    names = {int(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, list)}
    keep, inside = {}, {}
    for labs in layout.labels:
        organ = labs[0]
        lesion = any(w in names.get(organ, "").lower() for w in ("tumo", "cancer", "lesion"))
        if len(labs) == 1 and lesion:
            continue
        keep[organ] = 2 if "kidney" in names.get(organ, "").lower() else 1
        for inner in labs[1:]:
            inside[inner] = organ
    return {
        "keep_largest": keep,
        "inside": inside,
        "min_size": {v: 10 for labs in layout.labels for v in labs},
    }


def postprocess_segmentation(seg: np.ndarray, rules: dict, removed: dict | None = None) -> np.ndarray:
    """Apply ``keep_largest`` {organ: n}, ``inside`` {inner: organ} and ``min_size`` {label: voxels}.
    ``removed``: if given, the voxels each rule set to background are added to it (``"keep_largest 1"``, ...)."""
    from scipy import ndimage

    seg = seg.copy()
    structure = ndimage.generate_binary_structure(seg.ndim, seg.ndim)
    report = removed if removed is not None else {}

    def drop(rule: str, where: np.ndarray) -> None:
        count = int(where.sum())
        if count:
            report[rule] = report.get(rule, 0) + count
            seg[where] = 0

    inner_of: dict[int, list[int]] = {}
    for inner, organ in rules.get("inside", {}).items():
        inner_of.setdefault(int(organ), []).append(int(inner))
    for organ, n in rules.get("keep_largest", {}).items():
        organ = int(organ)
        members = [organ, *inner_of.get(organ, [])]
        mask = np.isin(seg, members)
        comps, num = ndimage.label(mask, structure)
        if num > int(n):
            sizes = np.bincount(comps.ravel())[1:]
            keep = np.argsort(sizes)[::-1][: int(n)] + 1
            drop(f"keep_largest {organ}", mask & ~np.isin(comps, keep))
    for inner, organ in rules.get("inside", {}).items():
        inner_mask = seg == int(inner)
        if not inner_mask.any():
            continue
        organ_zone = ndimage.binary_dilation(seg == int(organ), structure)
        comps, num = ndimage.label(inner_mask, structure)
        touching = np.unique(comps[organ_zone & inner_mask])
        drop(f"inside {int(inner)}", inner_mask & ~np.isin(comps, touching[touching > 0]))
    for label, size in rules.get("min_size", {}).items():
        mask = seg == int(label)
        comps, num = ndimage.label(mask, structure)
        if num:
            sizes = np.bincount(comps.ravel())
            small = np.flatnonzero(sizes < int(size))
            drop(f"min_size {int(label)}", mask & np.isin(comps, small[small > 0]))
    return seg


# ---------------------------------------------------------------------------------------------------- CLI
def _model_folder(args) -> Path:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_ext.core.paths import dataset_name

    if args.model_folder:
        return Path(args.model_folder)
    if not os.environ.get("nnUNet_results"):
        raise UserError("nnUNet_results is not set; export it or pass --model-folder.")
    return Path(get_output_folder(dataset_name(args.dataset), args.trainer, args.plans, args.configuration))


def _cmd_predict(args) -> int:
    if args.task and args.by_prefix:
        raise UserError("give either --task or --by-prefix, not both.")
    if not args.model_folder and not (args.dataset and args.configuration):
        raise UserError(
            "pass -d DATASET -c CONFIGURATION (and -tr/-p if not the defaults) or --model-folder."
        )
    if not 0 < args.step_size <= 1:
        raise UserError(
            f"--step-size {args.step_size}: the tile step is a fraction of the patch in (0, 1]; 0.5 is nnU-Net's."
        )
    folds = [f if f == "all" else int(f) for f in args.folds] if args.folds else None
    predictor, layout = load_predictor(
        _model_folder(args), folds, args.checkpoint, args.device, not args.disable_tta, args.step_size
    )
    for t in args.task or []:
        layout.task_index(t)
    done = predict_tasks(
        predictor,
        layout,
        args.input,
        args.output,
        args.task,
        args.by_prefix,
        per_task=args.per_task,
        equal_weights=args.equal_weights,
        overwrite=args.overwrite,
    )
    modes = sorted(set(done.values()))
    print(
        f"predicted {len(done)} case(s) into {args.output} ({', '.join(modes)}); tasks of the model: {list(layout.tasks)}"
    )
    return 0


def _parse_rules(items, what: str, labels: dict[int, str], minimum: int, second: str) -> dict[int, int]:
    """``A:B`` pairs of whole numbers: A a foreground label the dataset.json declares, B >= ``minimum``
    (``second`` = what B is: a label, a count, voxels)."""
    out = {}
    for item in items or []:
        parts = item.split(":")
        try:
            a, b = (int(x) for x in parts)
        except ValueError:
            raise UserError(
                f"{what} expects two whole numbers LABEL:{second.upper()}, got {item!r} (e.g. {what} 1:"
                f"{max(minimum, 1)})."
            ) from None
        for value in (a, b) if second == "organ" else (a,):
            if value not in labels:
                raise UserError(
                    f"{what} {item}: label {value} is not a foreground label of the dataset.json "
                    f"({ {v: k for v, k in sorted(labels.items())} }); use one of those values."
                )
        if b < minimum:
            raise UserError(f"{what} {item}: the {second} must be at least {minimum}, got {b}.")
        out[a] = b
    return out


def _cmd_postprocess(args) -> int:
    import SimpleITK as sitk

    from nnunet_ext.core.io import read_json
    from nnunet_ext.multitask.tasks import TASKS_KEY

    in_dir = Path(args.input)
    if not in_dir.is_dir():
        raise UserError(
            f"the prediction folder {in_dir} does not exist; pass -i the folder nnUNetv2_predict wrote."
        )
    dj_path = Path(args.dataset_json) if args.dataset_json else in_dir / "dataset.json"
    if not dj_path.is_file():
        raise UserError(f"no dataset.json at {dj_path}; pass --dataset-json (the model's dataset.json).")
    dataset_json = read_json(dj_path, "the dataset.json", "pass the model's dataset.json with --dataset-json")
    if not isinstance(dataset_json.get("labels"), dict):
        raise UserError(f"{dj_path} has no 'labels' dict; pass the model's dataset.json with --dataset-json.")
    labels = {}
    for name, value in dataset_json["labels"].items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v > 0:
                labels[v] = name
    mots_plan = None
    if args.preset == "mots":  # DoDNet's postp.py rules per MOTS task (nnunet_ext/challenges/mots.py)
        from nnunet_ext.challenges.mots import dodnet_postprocessing_plan

        if args.keep_largest or args.inside or args.min_size or args.no_defaults:
            raise UserError(
                "--preset mots is DoDNet's rule set; drop --keep-largest / --inside / --min-size / --no-defaults."
            )
        mots_plan = dodnet_postprocessing_plan(dataset_json)
        rules = {"preset": "mots", "tasks": {t: {"organ": o, "tumour": u} for t, o, u in mots_plan}}
    else:
        given = {
            "keep_largest": _parse_rules(
                [i if ":" in i else f"{i}:1" for i in args.keep_largest or []],
                "--keep-largest",
                labels,
                1,
                "count",
            ),
            "inside": _parse_rules(args.inside, "--inside", labels, 1, "organ"),
            "min_size": _parse_rules(args.min_size, "--min-size", labels, 1, "voxels"),
        }
        for inner, organ in given["inside"].items():
            if inner == organ:
                raise UserError(
                    f"--inside {inner}:{organ}: a label cannot lie inside itself; name its organ."
                )
        explicit = any(given.values())
        if args.no_defaults:
            rules = {"keep_largest": {}, "inside": {}, "min_size": {}}
        elif TASKS_KEY not in dataset_json:
            # the default rules know organ, tumour and task from the registry; without one every label would
            # be treated as part of one organ (a whole spleen removed as a "second component" of the liver)
            if not explicit:
                raise UserError(
                    f"{dj_path} has no task registry ({TASKS_KEY}), from which the default rules (largest organ, "
                    f"tumour inside organ) are derived; give the rules yourself (--keep-largest LABEL[:N], "
                    f"--inside INNER:ORGAN, --min-size LABEL:VOXELS), use --preset mots for MOTS predictions, "
                    f"or pass the multi-task model's dataset.json with --dataset-json."
                )
            print(f"note: {dj_path} has no task registry; only the rules given by flags are applied.")
            rules = {"keep_largest": {}, "inside": {}, "min_size": {}}
        else:
            rules = default_postprocessing_rules(dataset_json)
        for kind, values in given.items():
            rules[kind].update(values)
        if not any(rules.values()):
            raise UserError(
                "no rule to apply: give --keep-largest, --inside or --min-size (or drop --no-defaults)."
            )
    ending = dataset_json.get("file_ending", ".nii.gz")
    files = sorted(p for p in in_dir.iterdir() if p.name.endswith(ending))
    if not files:
        raise UserError(f"no *{ending} predictions in {in_dir}.")
    out_dir = Path(args.output)
    if out_dir.resolve() == in_dir.resolve():
        raise UserError(
            "write the post-processed predictions to another folder (-o); the input is never modified."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    from nnunet_ext.core.io import atomic_write_json

    removed: dict[str, dict[str, int]] = {}  # case -> rule (MOTS: "label N") -> voxels set to background
    for p in files:
        image = sitk.ReadImage(str(p))
        before = sitk.GetArrayFromImage(image)
        case = removed.setdefault(p.name[: -len(ending)], {})
        if mots_plan is not None:
            from nnunet_ext.challenges.mots import apply_dodnet_postprocessing

            voxel_volume = float(np.prod(image.GetSpacing()))
            seg = apply_dodnet_postprocessing(before, mots_plan, voxel_volume)
            changed = before[(seg != before)]
            for value, count in zip(*np.unique(changed, return_counts=True)):
                case[f"label {int(value)}"] = int(count)
        else:
            seg = postprocess_segmentation(before, rules, case)
        out = sitk.GetImageFromArray(seg.astype(sitk.GetArrayViewFromImage(image).dtype))
        out.CopyInformation(image)
        tmp = out_dir / f".tmp-{p.name}"
        sitk.WriteImage(out, str(tmp), True)
        os.replace(tmp, out_dir / p.name)
    atomic_write_json(out_dir / "dataset.json", dataset_json)
    totals: dict[str, int] = {}
    for case in removed.values():
        for rule, voxels in case.items():
            totals[rule] = totals.get(rule, 0) + voxels
    record = (
        rules if mots_plan is not None else {k: {str(a): b for a, b in v.items()} for k, v in rules.items()}
    )
    record = {**record, "removed_voxels": {"total": totals, "cases": removed}}
    atomic_write_json(out_dir / "postprocessing.json", record)
    print(f"post-processed {len(files)} case(s) into {out_dir}; rules: {rules}")
    for rule in sorted(totals):
        hit = sum(1 for case in removed.values() if case.get(rule))
        print(f"  {rule}: {totals[rule]} voxels set to background in {hit} case(s)")
    if not totals:
        print("  no voxel was changed")
    print(f"per-case counts: {out_dir / 'postprocessing.json'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="DoDNet/TransDoDNet/UniSeg prediction: all tasks, one task (--task) or each case's task (--by-prefix)",
        description="Predict with a DoDNet / TransDoDNet / UniSeg model (-tr nnUNetTrainerUniSeg) through nnU-Net's "
        "predictor. Without --task / "
        "--by-prefix this equals nnUNetv2_predict (the universal label map). See docs/dodnet.md.",
    )
    p.add_argument(
        "-i", "--input", required=True, help="folder with images in nnU-Net layout (CASE_0000.nii.gz)"
    )
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("-d", "--dataset", help="dataset id or name")
    p.add_argument("-c", "--configuration", help="configuration, e.g. 3d_fullres")
    p.add_argument(
        "-tr", "--trainer", default="nnUNetTrainerDoDNet", help="trainer (default nnUNetTrainerDoDNet)"
    )
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--folds", nargs="+", type=fold_arg, help="folds (default: all found)")
    p.add_argument(
        "-chk",
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint file name (default checkpoint_final.pth)",
    )
    p.add_argument("--model-folder", help="the trained model folder instead of -d/-c/-tr/-p")
    p.add_argument("--task", action="append", help="predict only this task's structures (repeat for several)")
    p.add_argument("--by-prefix", action="store_true", help="each case with the task its name's prefix names")
    p.add_argument(
        "--per-task",
        action="store_true",
        help="one label map per task (OUT/<task>/CASE.nii.gz; all tasks or the --task ones): overlapping "
        "structures of different tasks are all kept",
    )
    p.add_argument(
        "--equal-weights",
        action="store_true",
        help="merge tasks with equal cross-task weights (for a model without the weights its validation stores)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into existing --per-task folders")
    p.add_argument(
        "-device", "--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (default)"
    )
    p.add_argument(
        "--disable_tta", "--disable-tta", action="store_true", help="no mirroring (test-time augmentation)"
    )
    p.add_argument(
        "-step_size",
        "--step-size",
        type=float,
        default=0.5,
        help="sliding-window step as a fraction of the patch (default 0.5, as nnU-Net)",
    )
    p.set_defaults(func=_cmd_predict)

    q = sub.add_parser(
        "postprocess",
        help="DoDNet-style post-processing of label maps: largest components, tumour inside organ, small blobs",
        description="Connected-component clean-up. Defaults come from the task registry of the predictions' "
        "dataset.json (see docs/dodnet.md); the flags add or override rules. Input files are never modified.",
    )
    q.add_argument("-i", "--input", required=True, help="folder with predicted label maps")
    q.add_argument("-o", "--output", required=True, help="output folder for the cleaned label maps")
    q.add_argument(
        "--dataset-json", help="dataset.json with labels and task registry (default: INPUT/dataset.json)"
    )
    q.add_argument(
        "--keep-largest", action="append", metavar="LABEL[:N]", help="keep the N largest components"
    )
    q.add_argument(
        "--inside", action="append", metavar="INNER:ORGAN", help="drop INNER components not touching ORGAN"
    )
    q.add_argument("--min-size", action="append", metavar="LABEL:VOXELS", help="drop smaller components")
    q.add_argument("--no-defaults", action="store_true", help="only the rules given by flags")
    q.add_argument(
        "--preset",
        choices=["mots"],
        help="mots: DoDNet's a_DynConv/postp.py rules per MOTS task (merged MOTS dataset or one mots-<task> "
        "source; see docs/challenges/mots.md) instead of the registry defaults",
    )
    q.set_defaults(func=_cmd_postprocess)
