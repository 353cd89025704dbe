"""UniSeg commands: ``nnunet-ext uniseg merge`` (tasks with different image channels in one dataset) and
``nnunet-ext uniseg convert-checkpoint`` (a UniSeg checkpoint -> plain nnU-Net weights for fine-tuning).
Prediction with ``--task`` / all tasks / by prefix is ``nnunet-ext predict`` (:mod:`nnunet_ext.multitask.predict`).
See docs/uniseg.md.

**Mixed modalities.** nnU-Net needs one channel count per dataset. ``uniseg merge`` merges raw datasets whose
channel counts differ (CT 1, CT+PET 2, BraTS 4) into one dataset with ``C_max`` channels: a task with ``c``
channels keeps them as channels ``0..c-1`` and gets all-zero images for the others; its registry entry
records ``"channels": c``. A merged channel keeps its modality name where every task agrees on it and no task
pads it; otherwise it is named ``mixed`` (nnU-Net then uses per-image z-score normalisation, which keeps the
padding exactly 0; CT normalisation would shift it and would mix CT statistics with other modalities). The
UniSeg network gives every channel count its own first-convolution kernels (see
:mod:`nnunet_ext.architectures.uniseg`). Labels are remapped exactly as ``nnunet-ext tasks merge`` does (same
spec format and checks; :func:`nnunet_ext.multitask.merge.plan_merge` validates every task).

**Fine-tuning conversion.** ``convert-checkpoint`` reads an nnU-Net checkpoint of ``nnUNetTrainerUniSeg`` and
writes ``{'network_weights': ...}`` for a plain PlainConvUNet / ResidualEncoderUNet of the same plans: drops
``prompt``, ``fusion.*`` and the cross-task merge weights, removes the prompt channel (the last input channel) from
``decoder.transpconvs.0.weight`` and keeps, of the first convolution, the kernels of one modality group
(``--channels N``: the group of N-channel tasks; default the group of the first task). The result loads into
``nnUNetv2_train ... -pretrained_weights FILE`` (which transfers everything but ``.seg_layers.``) and strictly
into a plain network with the same number of output channels.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from nnunet_ext.core.errors import UserError

__all__ = ["merge_mixed_modalities", "convert_checkpoint", "convert_state_dict", "add_parser"]

MIXED = "mixed"


# --------------------------------------------------------------------------------------------------- merge
def _channel_names(dj: Mapping) -> list[str]:
    ch = dj.get("channel_names", dj.get("modality", {}))
    return [str(ch[k]) for k in sorted(ch, key=int)]


def merge_mixed_modalities(
    spec: Mapping,
    out_root: str | os.PathLike,
    dataset_id: int,
    name: str | None = None,
    sources: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Merge raw datasets with (possibly) different channel counts; see the module docstring."""

    from nnunet_ext.core.datasets import check_dataset_id_and_name
    from nnunet_ext.multitask.merge import MergePlan, _dataset_json, plan_merge, write_merged_dataset
    from nnunet_ext.multitask.tasks import TASKS_KEY, load_task_registry

    name = name or spec.get("name") or "UniSegMerged"
    check_dataset_id_and_name(dataset_id, name)
    tasks_spec = spec.get("tasks")
    if not isinstance(tasks_spec, Mapping) or not tasks_spec:
        raise UserError(
            'the merge spec needs "tasks": {TASK: {"source": DATASET, "labels": {SRC: UNIFIED}}}.'
        )
    sources = dict(sources or {})
    unknown = sorted(set(sources) - set(tasks_spec))
    if unknown:
        raise UserError(f"--source names task(s) {unknown} that the spec does not have: {list(tasks_spec)}.")
    # every task is checked by tasks-merge's own planner (labels, cases, images, endings) ...
    tasks = []
    for tname, entry in tasks_spec.items():
        sub = {"tasks": {tname: dict(entry)}}
        tasks.extend(plan_merge(sub, {tname: sources[tname]} if tname in sources else None).tasks)
    # ... and the tasks must agree on everything but the channels
    for key in ("file_ending", "overwrite_image_reader_writer"):
        values = {t.name: t.dataset_json.get(key) for t in tasks}
        if len(set(map(str, values.values()))) > 1:
            raise UserError(
                f"the sources disagree on {key}: {values}; convert them to one file format first."
            )
    order: list[str] = []
    for t in tasks:
        for v in sorted(t.label_map):
            n = t.label_map[v]
            if n not in (None, "ignore") and n not in order:
                order.append(n)
    wanted = spec.get("labels")
    if wanted is not None:
        if sorted(wanted) != sorted(order):
            raise UserError(f'"labels" must list exactly the unified labels {order}, got {list(wanted)}.')
        order = list(wanted)
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(order)}}
    if any("ignore" in t.label_map.values() for t in tasks):
        labels["ignore"] = len(labels)
    names = {t.name: _channel_names(t.dataset_json) for t in tasks}
    c_max = max(len(v) for v in names.values())
    channel_names = {}
    for c in range(c_max):
        have = {n[c].strip().lower() for n in names.values() if len(n) > c}
        padded = any(len(n) <= c for n in names.values())
        first = next(n[c] for n in names.values() if len(n) > c)
        channel_names[str(c)] = first if (len(have) == 1 and not padded) else MIXED
    plan = MergePlan(
        tasks,
        labels,
        channel_names,
        tasks[0].dataset_json["file_ending"],
        tasks[0].dataset_json.get("overwrite_image_reader_writer"),
    )
    dj = _dataset_json(plan, name)
    for t in tasks:
        dj[TASKS_KEY][t.name]["channels"] = len(names[t.name])
        dj["nnunet_ext_merge"][t.name]["channel_names"] = names[t.name]
    load_task_registry(dj, [t.prefix + c for t in tasks for c in t.cases])

    # tasks merge's writer, with uniseg's channel policy: each task's own channels, zero images up to c_max
    return write_merged_dataset(
        plan, dj, out_root, dataset_id, name, force, channels=lambda task: len(names[task.name]), pad_to=c_max
    )


# ------------------------------------------------------------------------------------------ fine-tuning
def convert_state_dict(weights: Mapping, plans: Mapping, channels: int | None = None) -> dict:
    """UniSeg network weights -> plain nnU-Net network weights (see the module docstring)."""
    from nnunet_ext.architectures.uniseg import modality_groups
    from nnunet_ext.uniseg.training import uniseg_facts_from_plans

    facts = uniseg_facts_from_plans(dict(plans))
    layout = facts["layout"]
    if "prompt" not in weights or "decoder.transpconvs.0.weight" not in weights:
        raise UserError(
            "these weights are not a UniSeg network's (no 'prompt' / decoder); pick a UniSeg checkpoint."
        )
    prompt = weights["prompt"]
    if prompt.shape[1] != layout.num_tasks:
        raise UserError(
            f"the checkpoint's prompt has {prompt.shape[1]} tasks but its plans' layout {layout.num_tasks}; "
            "use the checkpoint with the plans.json of the same model folder."
        )
    task_channels = facts.get("task_channels")
    stem_inputs = None
    w0 = weights["decoder.transpconvs.0.weight"]
    c_bottleneck = w0.shape[0] - 1
    out = {}
    if task_channels:
        counts, group_of, offsets = modality_groups(task_channels)
        stem_inputs = sum(counts)
        want = task_channels[0] if channels is None else int(channels)
        if want not in counts:
            raise UserError(
                f"--channels {want}: the model's modality groups have {counts} channels; pick one of them."
            )
        g = counts.index(want)
        keep = list(range(offsets[g], offsets[g] + counts[g]))
    else:
        keep = None
    for key, value in weights.items():
        if key in ("prompt", "merge_weights", "merge_weights_set") or key.startswith("fusion."):
            continue  # UniSeg-only parts (prompt, fusion, cross-task merge weights)
        if key.endswith("transpconvs.0.weight") and value.shape[0] == c_bottleneck + 1:
            value = value[:c_bottleneck]
        elif (
            keep is not None
            and stem_inputs != len(keep)
            and value.ndim >= 3
            and value.shape[1] == stem_inputs
            and _is_stem_key(key)
        ):
            value = value[:, keep]
        out[key] = value.clone()
    return out


def _is_stem_key(key: str) -> bool:
    k = key[len("decoder.") :] if key.startswith("decoder.encoder.") else key
    return k in (
        "encoder.stages.0.0.convs.0.conv.weight",
        "encoder.stages.0.0.convs.0.all_modules.0.weight",
        "encoder.stem.convs.0.conv.weight",
        "encoder.stem.convs.0.all_modules.0.weight",
    )


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, channels: int | None = None, overwrite: bool = False
) -> Path:
    """Read a UniSeg nnU-Net checkpoint, write plain weights for ``-pretrained_weights`` (atomically)."""
    import torch

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(
            f"{src} does not exist; pass a UniSeg checkpoint (MODEL/fold_X/checkpoint_final.pth)."
        )
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists; pass --overwrite to replace it or choose another -o.")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file)
        raise UserError(f"cannot read {src} as a PyTorch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise UserError(f"{src} is not an nnU-Net checkpoint (no 'network_weights').")
    plans = (ckpt.get("init_args") or {}).get("plans")
    if plans is None:
        plans_file = src.parent.parent / "plans.json"
        if not plans_file.is_file():
            raise UserError(f"{src} has no plans in init_args and there is no {plans_file}.")
        plans = json.loads(plans_file.read_text(encoding="utf-8"))
    weights = convert_state_dict(ckpt["network_weights"], plans, channels)
    out = {
        "network_weights": weights,
        "nnunet_ext_converted_from": {
            "checkpoint": str(src.resolve()),
            "trainer": ckpt.get("trainer_name"),
            "channels": channels,
        },
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(out, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------------- CLI
def _cmd_convert(args) -> int:
    dst = convert_checkpoint(args.input, args.output, args.channels, args.overwrite)
    print(f"wrote {dst}")
    print(
        f"next: nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerUniSegFT -pretrained_weights {dst}"
        " (or -tr nnUNetTrainerBANet: encoder and segmentation decoder transfer, the boundary decoder starts new)"
    )
    return 0


def _cmd_merge(args) -> int:
    from nnunet_ext.multitask.merge import spec_and_sources_from_args

    spec, sources, out = spec_and_sources_from_args(args)
    target = merge_mixed_modalities(spec, out, args.id, args.name, sources, args.force)
    dj = json.loads((target / "dataset.json").read_text(encoding="utf-8"))
    print(f"wrote {target}")
    print(f"  channels {dj['channel_names']}; labels {dj['labels']}")
    for t, e in dj["nnunet_ext_tasks"].items():
        print(f"  task {t}: prefix {e['prefixes'][0]!r}, {e['channels']} channel(s), labels {e['labels']}")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.id} --verify_dataset_integrity -c 3d_fullres")
    return 0


def add_parser(sub) -> None:
    from nnunet_ext.multitask.merge import add_merge_arguments

    p = sub.add_parser(
        "uniseg",
        help="UniSeg: merge tasks with different image channels; convert a checkpoint for fine-tuning",
        description="UniSeg helpers (see docs/uniseg.md). Prediction: nnunet-ext predict -tr nnUNetTrainerUniSeg.",
    )
    s = p.add_subparsers(dest="uniseg_command", metavar="{merge,convert-checkpoint}")
    s.required = True
    m = s.add_parser(
        "merge",
        help="merge raw datasets with different channel counts (zero-padded, per-task channel count in the registry)",
        description="Like `nnunet-ext tasks merge` (same --spec/--map/--source), but sources may have different "
        "numbers of image channels. Sources are never modified.",
    )
    add_merge_arguments(m, "UniSegMerged", presets=False)
    m.set_defaults(func=_cmd_merge)
    c = s.add_parser(
        "convert-checkpoint",
        help="UniSeg checkpoint -> plain nnU-Net weights for nnUNetv2_train -pretrained_weights",
        description="Drop prompt and fusion, remove the prompt channel from the first decoder stage, keep one "
        "modality group's first-conv kernels; writes {'network_weights': ...}.",
    )
    c.add_argument(
        "-i", "--input", required=True, help="checkpoint of nnUNetTrainerUniSeg (checkpoint_final.pth)"
    )
    c.add_argument("-o", "--output", required=True, help="output .pth file")
    c.add_argument(
        "--channels",
        type=int,
        default=None,
        help="keep the first-conv kernels of the tasks with this many image channels (default: the first task's)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=_cmd_convert)
