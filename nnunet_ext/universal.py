"""DoDNet / TransDoDNet inference commands: ``nnunet-ext predict`` (universal, single-task or by case-name prefix)
and ``nnunet-ext postprocess`` (DoDNet-style connected-component clean-up). See docs/dodnet.md.

The stock ``nnUNetv2_predict -tr nnUNetTrainerDoDNet`` already writes the universal label map (every task's
structures from one backbone pass; the network's eval output is softmax-compatible logits over the unified
label space). ``nnunet-ext predict`` runs the same nnU-Net predictor with the network restricted to some
tasks (``DoDNet.set_inference_tasks``): ``--task liver`` outputs only that task's structures, ``--by-prefix``
gives every case the task its file name's prefix names in the model's task registry.

UniSeg models (``-tr nnUNetTrainerUniSeg``, docs/uniseg.md) take the same options: their eval forward merges all
tasks (encoder once, the task decoders batched); ``--task`` / ``--by-prefix`` hand the predictor a wrapper
whose ``forward(x)`` is ``UniSeg.forward_global(x, tasks)`` (no task attribute on the network). Cases may
omit the channels their task does not have (the network zero-pads them, as the merged dataset does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_ext.errors import UserError

__all__ = [
    "load_predictor",
    "predict_tasks",
    "postprocess_segmentation",
    "default_postprocessing_rules",
    "add_parser",
]


def _unwrap(network):
    from torch._dynamo import OptimizedModule

    return network._orig_mod if isinstance(network, OptimizedModule) else network


def _task_restricted_network_class():
    from torch import nn

    class TaskRestrictedNetwork(nn.Module):
        """What nnU-Net's predictor calls as ``network(x)`` for a UniSeg model restricted to some tasks:
        ``forward_global(x, tasks)`` (the encoder once, the tasks' decoder passes batched, merged into the global
        label map). Weights load into the wrapped network (the predictor loads every fold's parameters)."""

        def __init__(self, net, tasks):
            super().__init__()
            self.net = net
            self.tasks = None if tasks is None else [int(t) for t in tasks]

        def forward(self, x):
            return self.net.forward_global(x, self.tasks)

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    return TaskRestrictedNetwork


def restrict_tasks(net, tasks):
    """A module whose ``forward(x)`` is ``net.forward_global(x, tasks)`` (UniSeg); torch is imported lazily."""
    return _task_restricted_network_class()(net, tasks)


def load_predictor(model_folder, folds, checkpoint="checkpoint_final.pth", device="auto", tta=True, step=0.5):
    """nnU-Net's predictor for a DoDNet / TransDoDNet / UniSeg model folder; returns (predictor, layout)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ext.partial import LAYOUT_KEY, TaskLayout
    from nnunet_ext.training import ext_trainer_env

    os.environ["nnUNet_extTrainer"] = ext_trainer_env()["nnUNet_extTrainer"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not (Path(model_folder) / "plans.json").is_file():
        raise UserError(f"{model_folder} is not a trained model folder (no plans.json); check -d/-c/-tr/-p.")
    predictor = nnUNetPredictor(
        tile_step_size=step,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint)
    net = _unwrap(predictor.network)
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
) -> dict[str, str]:
    """Predict every case of ``input_folder`` (nnU-Net raw image layout) into ``output_folder``: with all tasks
    (universal), with ``tasks`` only, or (``by_prefix``) each case with its own task. Returns case -> mode."""
    from nnunetv2.utilities.utils import (
        create_lists_from_splitted_dataset_folder,
        get_identifiers_from_splitted_dataset_folder,
    )

    from nnunet_ext.tasks import TASKS_KEY, load_task_registry

    net = _unwrap(predictor.network)
    ending = predictor.dataset_json["file_ending"]
    cases = [str(c) for c in get_identifiers_from_splitted_dataset_folder(str(input_folder), ending)]
    if not cases:
        raise UserError(f"no images *_0000{ending} in {input_folder}.")
    os.makedirs(output_folder, exist_ok=True)
    groups: dict[str, tuple[list[int] | None, list[str]]] = {}
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
        for c in cases:
            t = registry.task_of(c)
            groups.setdefault(t, ([layout.task_index(t)], []))[1].append(c)
    elif tasks:
        groups["+".join(tasks)] = ([layout.task_index(t) for t in tasks], list(cases))
    else:
        groups["universal"] = (None, list(cases))
    done = {}
    original = predictor.network
    uniseg = hasattr(net, "forward_global")
    try:
        for mode, (indices, group) in groups.items():
            if uniseg:  # UniSeg: the task selection is an argument of forward_global, bound by a wrapper
                predictor.network = restrict_tasks(net, indices)
            else:
                net.set_inference_tasks(indices)
            lists = create_lists_from_splitted_dataset_folder(str(input_folder), ending, group)
            outs = [os.path.join(output_folder, c) for c in group]
            predictor.predict_from_files_sequential(lists, outs, False, True, None)
            done.update({c: mode for c in group})
    finally:
        predictor.network = original
        if not uniseg:
            net.set_inference_tasks(None)
    from nnunet_ext.io import atomic_write_json

    atomic_write_json(
        Path(output_folder) / "nnunet_ext_predict.json", {"tasks": list(layout.tasks), "cases": done}
    )
    return done


# ---------------------------------------------------------------------------------------------- post-processing
def default_postprocessing_rules(dataset_json: dict) -> dict:
    """DoDNet-style rules from the task registry: per task with several labels, the first is the organ (largest
    connected component of organ + its inner labels; 2 for a kidney) and the others must lie inside it; a
    single-label task keeps its largest component unless its name says tumour/cancer/lesion. Every label drops
    components below ``min_size`` voxels."""
    from nnunet_ext.partial import TaskLayout

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


def postprocess_segmentation(seg: np.ndarray, rules: dict) -> np.ndarray:
    """Apply ``keep_largest`` {organ: n}, ``inside`` {inner: organ} and ``min_size`` {label: voxels}."""
    from scipy import ndimage

    seg = seg.copy()
    structure = ndimage.generate_binary_structure(seg.ndim, seg.ndim)
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
            seg[mask & ~np.isin(comps, keep)] = 0
    for inner, organ in rules.get("inside", {}).items():
        inner_mask = seg == int(inner)
        if not inner_mask.any():
            continue
        organ_zone = ndimage.binary_dilation(seg == int(organ), structure)
        comps, num = ndimage.label(inner_mask, structure)
        touching = np.unique(comps[organ_zone & inner_mask])
        seg[inner_mask & ~np.isin(comps, touching[touching > 0])] = 0
    for label, size in rules.get("min_size", {}).items():
        mask = seg == int(label)
        comps, num = ndimage.label(mask, structure)
        if num:
            sizes = np.bincount(comps.ravel())
            small = np.flatnonzero(sizes < int(size))
            seg[mask & np.isin(comps, small[small > 0])] = 0
    return seg


# ---------------------------------------------------------------------------------------------------- CLI
def _model_folder(args) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if args.model_folder:
        return Path(args.model_folder)
    if not os.environ.get("nnUNet_results"):
        raise UserError("nnUNet_results is not set; export it or pass --model-folder.")
    try:
        name = maybe_convert_to_dataset_name(args.dataset)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot resolve dataset {args.dataset!r}: {e}") from e
    return Path(get_output_folder(name, args.trainer, args.plans, args.configuration))


def _cmd_predict(args) -> int:
    if args.task and args.by_prefix:
        raise UserError("give either --task or --by-prefix, not both.")
    if not args.model_folder and not (args.dataset and args.configuration):
        raise UserError(
            "pass -d DATASET -c CONFIGURATION (and -tr/-p if not the defaults) or --model-folder."
        )
    folds = [f if f == "all" else int(f) for f in args.folds] if args.folds else None
    predictor, layout = load_predictor(
        _model_folder(args), folds, args.checkpoint, args.device, not args.disable_tta, args.step_size
    )
    for t in args.task or []:
        layout.task_index(t)
    done = predict_tasks(predictor, layout, args.input, args.output, args.task, args.by_prefix)
    modes = sorted(set(done.values()))
    print(
        f"predicted {len(done)} case(s) into {args.output} ({', '.join(modes)}); tasks of the model: {list(layout.tasks)}"
    )
    return 0


def _parse_rules(items, what):
    out = {}
    for item in items or []:
        if ":" not in item:
            raise UserError(f"{what} expects A:B, got {item!r}.")
        a, b = item.split(":", 1)
        out[int(a)] = int(b)
    return out


def _cmd_postprocess(args) -> int:
    import SimpleITK as sitk

    in_dir = Path(args.input)
    dj_path = Path(args.dataset_json) if args.dataset_json else in_dir / "dataset.json"
    if not dj_path.is_file():
        raise UserError(f"no dataset.json at {dj_path}; pass --dataset-json (the model's dataset.json).")
    dataset_json = json.loads(dj_path.read_text(encoding="utf-8"))
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
        rules = (
            {"keep_largest": {}, "inside": {}, "min_size": {}}
            if args.no_defaults
            else default_postprocessing_rules(dataset_json)
        )
        rules["keep_largest"].update(
            _parse_rules([i if ":" in i else f"{i}:1" for i in args.keep_largest or []], "--keep-largest")
        )
        rules["inside"].update(_parse_rules(args.inside, "--inside"))
        rules["min_size"].update(_parse_rules(args.min_size, "--min-size"))
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
    from nnunet_ext.io import atomic_write_json

    for p in files:
        image = sitk.ReadImage(str(p))
        if mots_plan is not None:
            from nnunet_ext.challenges.mots import apply_dodnet_postprocessing

            voxel_volume = float(np.prod(image.GetSpacing()))
            seg = apply_dodnet_postprocessing(sitk.GetArrayFromImage(image), mots_plan, voxel_volume)
        else:
            seg = postprocess_segmentation(sitk.GetArrayFromImage(image), rules)
        out = sitk.GetImageFromArray(seg.astype(sitk.GetArrayViewFromImage(image).dtype))
        out.CopyInformation(image)
        tmp = out_dir / f".tmp-{p.name}"
        sitk.WriteImage(out, str(tmp), True)
        os.replace(tmp, out_dir / p.name)
    atomic_write_json(out_dir / "dataset.json", dataset_json)
    atomic_write_json(
        out_dir / "postprocessing.json",
        rules if mots_plan is not None else {k: {str(a): b for a, b in v.items()} for k, v in rules.items()},
    )
    print(f"post-processed {len(files)} case(s) into {out_dir}; rules: {rules}")
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
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-d", "--dataset", help="dataset id or name")
    p.add_argument("-c", "--configuration")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerDoDNet")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--folds", nargs="+", help="folds (default: all found)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--model-folder", help="the trained model folder instead of -d/-c/-tr/-p")
    p.add_argument("--task", action="append", help="predict only this task's structures (repeat for several)")
    p.add_argument("--by-prefix", action="store_true", help="each case with the task its name's prefix names")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring")
    p.add_argument("--step-size", type=float, default=0.5)
    p.set_defaults(func=_cmd_predict)

    q = sub.add_parser(
        "postprocess",
        help="DoDNet-style post-processing of label maps: largest components, tumour inside organ, small blobs",
        description="Connected-component clean-up. Defaults come from the task registry of the predictions' "
        "dataset.json (see docs/dodnet.md); the flags add or override rules. Input files are never modified.",
    )
    q.add_argument("-i", "--input", required=True, help="folder with predicted label maps")
    q.add_argument("-o", "--output", required=True)
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
