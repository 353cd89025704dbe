"""MedSeqFT (arXiv 2509.06096): MDS buffer selection, the feature taps K&G RFT distils, and the CLI.

* :func:`load_checkpoint_network` rebuilds the network of any nnU-Net checkpoint from the checkpoint alone
  (its ``init_args`` hold plans, configuration and dataset.json; ``trainer_name`` says which trainer builds
  the network) and loads its weights strictly;
* :func:`unet_features` runs an nnU-Net U-Net (``encoder`` + ``UNetDecoder``: PlainConvUNet,
  ResidualEncoderUNet) and returns the segmentation output AND the feature maps (every encoder stage, every
  decoder stage); :class:`FeatureTap` wraps a network so that one forward pass (one DDP / torch.compile
  graph) returns both;
* :func:`select_buffer` is MDS (Maximum Data Similarity) selection, ``nnunet-ext medseqft select``;
* ``nnunet-ext medseqft run`` (:mod:`nnunet_ext.medseqft.run`) runs a whole task sequence.

MDS scores (lower = closer to the pre-training distribution of the foundation model M_0; the K lowest are
the buffer). Candidates are the training cases of one nnU-Net fold (:func:`fold_training_keys`), so the
fold's validation cases are never distilled on. Views: ``views`` random crops of the configuration's patch size (zero padded where the case is
smaller), each with random flips along every spatial axis, seeded per case by ``(seed, case index)``.

* ``objective`` (default when the checkpoint has the head of its pre-training objective, i.e. the
  segmentation head of an nnU-Net checkpoint): M_0's pre-training loss (nnU-Net's Dice + CE, without deep
  supervision) on each view. The new task's labels live in another label space, so the target is M_0's own
  prediction on the un-flipped crop and the loss is evaluated on the flipped view (mapped back): low when
  M_0 is confident and consistent, as on its training data. Averaged over the views.
* ``features`` (checkpoints without that head, or on request): per view, the channel-wise mean and standard
  deviation of every encoder stage's output; averaged over views into one vector per case; the score is the
  mean squared z-score of that vector against a reference set: the preprocessed cases of
  ``--reference DATASET`` (the pre-training data, when available) or else the candidate cases themselves
  (then it ranks cases by how typical they are under M_0's features).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.core.datasets import RawDatasetWriter, check_dataset_id_and_name, existing_datasets_with_id
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.inference import torch_device
from nnunet_ext.core.io import atomic_write_json, make_temp_dir, read_json
from nnunet_ext.core.paths import dataset_name
from nnunet_ext.core.progress import progress as progress_bar
from nnunet_ext.medseqft.settings import BUFFER_FILE, PHANTOM_TASKS, SCORES

# ------------------------------------------------------------------------------------ networks

RETRAIN = "pass the fold's checkpoint_final.pth written by nnUNetv2_train, or retrain that fold"


def read_checkpoint(
    checkpoint: str | os.PathLike,
    what: str = "checkpoint",
    fix: str = RETRAIN,
    keys: tuple[str, ...] = ("network_weights",),
) -> dict:
    """``torch.load`` of an nnU-Net checkpoint (on the CPU). A missing, truncated or garbage file, or one without
    ``keys``, is a one-line :class:`UserError` naming the file and ``fix``."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage pickle, empty file, unreadable file ...
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{what} {path} is not a readable PyTorch checkpoint ({type(e).__name__}"
            f"{': ' + reason if reason else ''}; truncated or not a checkpoint); {fix}."
        ) from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{what} {path} is not an nnU-Net v2 checkpoint (no {' / '.join(missing)}); {fix}.")
    return ckpt


def load_checkpoint_network(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Network + plans of an nnU-Net checkpoint, from the checkpoint alone.

    Returns a dict: ``network`` (eval mode, deep supervision off, weights loaded strictly), ``plans_manager``,
    ``configuration_manager``, ``dataset_json``, ``label_manager``, ``trainer_name``, ``weights``.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.core.nnunet_commands import find_trainer

    ckpt = read_checkpoint(checkpoint, keys=("network_weights", "init_args"))
    init = ckpt["init_args"]
    plans_manager = PlansManager(init["plans"])
    configuration_manager = plans_manager.get_configuration(init["configuration"])
    dataset_json = init["dataset_json"]
    label_manager = plans_manager.get_label_manager(dataset_json)
    trainer = find_trainer(ckpt.get("trainer_name", "nnUNetTrainer"))
    network = trainer.build_network_architecture(
        plans_manager,
        configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads,
        False,
    )
    weights = {k[7:] if k.startswith("module.") else k: v for k, v in ckpt["network_weights"].items()}
    network.load_state_dict(weights)
    network.to(torch_device(device)).eval()
    return {
        "network": network,
        "plans_manager": plans_manager,
        "configuration_manager": configuration_manager,
        "dataset_json": dataset_json,
        "label_manager": label_manager,
        "trainer_name": ckpt.get("trainer_name", "nnUNetTrainer"),
        "weights": weights,
        "checkpoint": ckpt,
    }


def check_unet(net: nn.Module) -> None:
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

    if not (hasattr(net, "encoder") and isinstance(getattr(net, "decoder", None), UNetDecoder)):
        raise UserError(
            f"{type(net).__name__} is not an nnU-Net U-Net with encoder + UNetDecoder (PlainConvUNet, "
            f"ResidualEncoderUNet); MedSeqFT's feature distillation and MDS feature score need one"
        )


def unet_features(net: nn.Module, x: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
    """``(net(x), features)`` for an nnU-Net U-Net: the output exactly as ``net(x)`` (deep supervision as set
    on the decoder), and the feature maps of every encoder stage then every decoder stage (before the heads).
    Same computation as ``UNetDecoder.forward``."""
    skips = net.encoder(x)
    decoder = net.decoder
    lres = skips[-1]
    seg, feats = [], []
    for s in range(len(decoder.stages)):
        y = decoder.transpconvs[s](lres)
        y = torch.cat((y, skips[-(s + 2)]), 1)
        y = decoder.stages[s](y)
        feats.append(y)
        if decoder.deep_supervision:
            seg.append(decoder.seg_layers[s](y))
        elif s == len(decoder.stages) - 1:
            seg.append(decoder.seg_layers[-1](y))
        lres = y
    seg = seg[::-1]
    return (seg if decoder.deep_supervision else seg[0]), [*skips, *feats]


class FeatureTap(nn.Module):
    """Training wrapper: ``forward(x)`` is ``net(x)``; ``forward(x, features=True)`` also returns the features
    (:func:`unet_features`), so the student's segmentation and distillation features come from ONE forward
    pass (one DDP reduction, one compiled graph). Holds no state of its own; ``decoder``/``encoder`` are
    the wrapped network's (nnU-Net sets deep supervision through ``network.decoder``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        check_unet(net)
        self.net = net

    @property
    def decoder(self):
        return self.net.decoder

    @property
    def encoder(self):
        return self.net.encoder

    def forward(self, x: torch.Tensor, features: bool = False):
        if not features:
            return self.net(x)
        return unet_features(self.net, x)


def feature_mse(
    student: list[torch.Tensor], teacher: list[torch.Tensor], normalise: bool = False
) -> torch.Tensor:
    """Mean over stages of the MSE between student and teacher feature maps (float32). ``normalise``: each
    stage's MSE divided by the teacher's feature variance of that stage (ResidualEncoderUNet stages are not
    normalised after the residual add, so raw MSEs differ in scale between stages and networks)."""
    if [f.shape for f in teacher] != [f.shape for f in student]:
        raise RuntimeError(
            "teacher and student feature maps differ in shape: the teacher checkpoint does not have this "
            "network's architecture (use the same plans for every task)"
        )
    values = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.detach().float()
        value = F.mse_loss(s, t)
        values.append(value / (t.var() + 1e-6) if normalise else value)
    return torch.stack(values).mean()


def logit_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0, regions: bool = False
) -> torch.Tensor:
    """Per-voxel output distillation: KL(teacher || student) of the softmax at ``temperature`` (times T^2, averaged
    over voxels and batch); region (sigmoid) outputs: MSE between the sigmoid probabilities at ``temperature``."""
    s, t = student.float() / temperature, teacher.detach().float() / temperature
    if regions:
        return F.mse_loss(torch.sigmoid(s), torch.sigmoid(t)) * temperature**2
    kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    return kl * temperature**2 / float(np.prod(s.shape[2:]))


def has_objective_head(weights: dict) -> bool:
    return any(".seg_layers." in k for k in weights)


# ------------------------------------------------------------------------------------ MDS


def _preprocessed(dataset: str | int, configuration: str, plans_identifier: str):
    """(dataset name, preprocessed folder of the configuration, dataset class, sorted training ids, plans)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if not nnUNet_preprocessed.is_set():
        raise UserError(
            "nnUNet_preprocessed is not set: export nnUNet_preprocessed=/path/to/nnUNet_preprocessed"
        )
    name = dataset_name(dataset)
    base = Path(str(nnUNet_preprocessed)) / name
    plans_file = base / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise UserError(f"{plans_file} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = read_json(
        plans_file, "the plans file", f"run nnUNetv2_plan_and_preprocess -d {dataset} again to rewrite it"
    )
    if not isinstance(plans.get("configurations"), dict):
        raise UserError(
            f"the plans file {plans_file} has no 'configurations'; run nnUNetv2_plan_and_preprocess -d "
            f"{dataset} again to rewrite it"
        )
    if configuration not in plans["configurations"]:
        raise UserError(
            f"configuration {configuration!r} is not in {plans_file} (has {', '.join(plans['configurations'])})"
        )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    folder = base / cm.data_identifier
    if not folder.is_dir():
        raise UserError(
            f"{folder} does not exist: dataset {dataset} is not preprocessed for {configuration}; run "
            f"nnUNetv2_preprocess -d {dataset} -c {configuration} -p {plans_identifier}"
        )
    cls = infer_dataset_class(str(folder))
    ids = sorted(cls.get_identifiers(str(folder)))
    if not ids:
        raise UserError(f"{folder} holds no preprocessed cases; re-run nnUNetv2_preprocess -d {dataset}")
    return name, base, folder, cls, ids, cm


def fold_training_keys(base: Path, ids: list[str], fold: int | str) -> list[str]:
    """The training keys of ``fold`` exactly as nnU-Net's ``nnUNetTrainer.do_split`` picks them (its
    ``splits_final.json`` when present, else the seeded 5-fold split nnU-Net would write, else nnU-Net's
    seeded 80:20 split for a fold beyond the file); ``"all"``: every case. Writes nothing."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if str(fold) == "all":
        return sorted(ids)
    try:
        fold = int(fold)
    except ValueError as e:
        raise UserError(f"fold must be an integer or 'all' (got {fold!r})") from e
    splits_file = base / "splits_final.json"
    if splits_file.is_file():
        splits = read_json(
            splits_file,
            "nnU-Net's split file",
            "repair it, or delete it so that nnU-Net's default 5-fold split is used",
            expect=list,
        )
        if not all(isinstance(s, dict) and isinstance(s.get("train"), list) for s in splits):
            raise UserError(
                f"nnU-Net's split file {splits_file} must be a list of {{'train': [...], 'val': [...]}}; repair "
                f"it, or delete it so that nnU-Net's default 5-fold split is used"
            )
    else:
        splits = generate_crossval_split(sorted(ids), seed=12345, n_splits=5)
    if fold < len(splits):
        keys = list(splits[fold]["train"])
    else:  # nnU-Net's fallback for a fold the split file lacks
        rnd = np.random.RandomState(seed=12345 + fold)
        all_keys = np.sort(list(ids))
        idx_tr = rnd.choice(len(all_keys), int(len(all_keys) * 0.8), replace=False)
        keys = [str(all_keys[i]) for i in idx_tr]
    keys = [str(k) for k in keys]  # nnU-Net's generated split holds numpy strings
    unknown = [k for k in keys if k not in set(ids)]
    if unknown:
        raise UserError(
            f"{splits_file} names cases that are not preprocessed (e.g. {unknown[:3]}); fix the split file or "
            f"re-run nnUNetv2_preprocess"
        )
    return sorted(keys)


def _views(data: np.ndarray, patch: tuple[int, ...], n: int, rng: np.random.Generator):
    """``n`` random crops of ``patch`` (zero padded) with random flips: [(crop, flip axes)]."""
    spatial = data.shape[1:]
    pad = [(0, 0)] + [(max(0, (p - s) // 2), max(0, p - s - (p - s) // 2)) for s, p in zip(spatial, patch)]
    if any(a or b for a, b in pad[1:]):
        data = np.pad(data, pad)
        spatial = data.shape[1:]
    out = []
    for _ in range(n):
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(spatial, patch)]
        crop = data[(slice(None), *[slice(a, a + p) for a, p in zip(start, patch)])]
        flips = tuple(i + 1 for i in range(len(patch)) if rng.random() < 0.5)
        out.append((np.ascontiguousarray(crop), flips))
    return out


def _objective_loss(net: nn.Module, x: torch.Tensor, flips: tuple[int, ...], label_manager) -> float:
    """M_0's Dice+CE on the flipped view against its own prediction on the view (no deep supervision)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    with torch.no_grad():
        target = net(x).argmax(1, keepdim=True)
        flip_dims = [d + 1 for d in flips]  # (B, C, *spatial): spatial axis i -> dim i + 1
        logits = net(torch.flip(x, flip_dims) if flip_dims else x)
        logits = torch.flip(logits, flip_dims) if flip_dims else logits
        return float(loss(logits.float(), target))


def _feature_vector(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        skips = net.encoder(x)
    parts = []
    for f in skips:
        f = f.float().flatten(2)
        parts += [f.mean(-1), f.std(-1)]
    return torch.cat(parts, 1)[0].cpu().numpy()


def select_buffer(
    checkpoint: str | os.PathLike,
    dataset: str | int,
    configuration: str,
    k: int | None = None,
    fraction: float = 0.2,
    views: int = 8,
    seed: int = 0,
    score: str = "auto",
    plans_identifier: str = "nnUNetPlans",
    reference: str | int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    fold: int | str = 0,
) -> dict:
    """Score every training case of ``fold`` of ``dataset`` (nnU-Net's split: the fold's validation cases are
    never scored nor buffered) under the foundation model; return the selection record (``buffer``: the K
    lowest-scoring cases, ``scores``: every scored case's score, and the settings). ``device``: ``auto`` (CUDA
    if available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    device = torch_device(device)
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if views < 1:
        raise UserError(f"--views must be >= 1 (got {views})")
    name, base, folder, dataset_class, all_ids, cm = _preprocessed(dataset, configuration, plans_identifier)
    ids = fold_training_keys(base, all_ids, fold)
    if k is None:
        if not 0 < fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1] (got {fraction})")
        k = max(1, round(fraction * len(ids)))
    if not 1 <= k <= len(ids):
        raise UserError(
            f"-k must be between 1 and the {len(ids)} training cases of fold {fold} of {name} (got {k})"
        )
    foundation = load_checkpoint_network(checkpoint, device)
    net = foundation["network"]
    used = score
    if score == "auto":
        used = "objective" if has_objective_head(foundation["weights"]) else "features"
    if used == "objective" and foundation["label_manager"].has_regions:
        raise UserError("the objective score supports softmax (non-region) checkpoints; use --score features")
    if used == "features":
        check_unet(net)
    patch = tuple(int(p) for p in cm.patch_size)
    ds = dataset_class(str(folder), ids)
    torch.manual_seed(seed)

    def case_values(dset, keys, what, desc):
        values = {}
        iterator = progress_bar(keys, desc, progress)
        for index, key in enumerate(iterator):
            data = np.asarray(dset.load_case(key)[0], dtype=np.float32)
            rng = np.random.default_rng([seed, index])
            per_view = []
            for crop, flips in _views(data, patch, views, rng):
                x = torch.from_numpy(crop)[None].to(device)
                if what == "objective":
                    per_view.append(_objective_loss(net, x, flips, foundation["label_manager"]))
                else:
                    if flips:
                        x = torch.flip(x, [d + 1 for d in flips])
                    per_view.append(_feature_vector(net, x))
            values[key] = float(np.mean(per_view)) if what == "objective" else np.mean(per_view, 0)
        return values

    values = case_values(ds, ids, used, f"MDS {name} ({used})")
    if used == "features":
        ref_values = values
        if reference is not None:
            rname, _, rfolder, rcls, rids, _ = _preprocessed(reference, configuration, plans_identifier)
            ref_values = case_values(rcls(str(rfolder), rids), rids, "features", f"reference {rname}")
        ref = np.stack(list(ref_values.values()))
        mu, sd = ref.mean(0), ref.std(0) + 1e-6
        values = {key: float(np.mean(((v - mu) / sd) ** 2)) for key, v in values.items()}
    ranked = sorted(ids, key=lambda c: (values[c], c))
    return {
        "dataset": name,
        "configuration": configuration,
        "plans": plans_identifier,
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "score": used,
        "views": int(views),
        "seed": int(seed),
        "fold": str(fold) if str(fold) == "all" else int(fold),
        "k": int(k),
        "reference": None if reference is None else str(reference),
        "buffer": ranked[:k],
        "scores": {c: values[c] for c in ranked},
    }


def buffer_path(dataset: str | int, plans_identifier: str = "nnUNetPlans", configuration: str = "") -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed.is_set():
        raise UserError(
            "nnUNet_preprocessed is not set: export nnUNet_preprocessed=/path/to/nnUNet_preprocessed"
        )
    name = dataset_name(dataset)
    return Path(str(nnUNet_preprocessed)) / name / BUFFER_FILE


SETTINGS = ("checkpoint", "configuration", "plans", "score", "views", "seed", "fold", "k", "reference")


def existing_buffer(path: str | os.PathLike, overwrite: bool) -> dict | None:
    """The buffer record already in ``path`` (None: no file, or ``overwrite``, which replaces it whatever it
    holds); a truncated, non-UTF-8 or wrongly shaped file is a one-line :class:`UserError` (pass --overwrite)."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return None
    return read_json(
        path,
        "the MDS buffer file",
        "pass --overwrite to select the buffer again and replace it, or delete the file",
    )


def write_buffer(record: dict, path: Path, overwrite: bool) -> Path:
    """Write the selection atomically; an existing file with other settings is kept unless ``overwrite``."""
    old = existing_buffer(path, overwrite)
    if old is not None:
        if any(old.get(s) != record.get(s) for s in SETTINGS):
            raise UserError(
                f"{path} already holds a buffer selected with other settings "
                f"({', '.join(f'{s}={old.get(s)!r}' for s in SETTINGS if old.get(s) != record.get(s))}); "
                f"pass --overwrite to replace it"
            )
    return atomic_write_json(path, record)


def load_buffer(folder: str | os.PathLike) -> dict:
    path = Path(folder) / BUFFER_FILE
    select = (
        "run `nnunet-ext medseqft select DATASET CONFIGURATION --checkpoint FOUNDATION.pth --overwrite` "
        "(it writes that file)"
    )
    if not path.is_file():
        raise RuntimeError(f"MedSeqFT needs an MDS buffer: {path} does not exist; {select}.")
    record = read_json(path, "the MDS buffer file", select)
    buffer = record.get("buffer")
    if not buffer:
        raise RuntimeError(f"{path} holds an empty buffer; re-run `nnunet-ext medseqft select` with -k >= 1")
    if not isinstance(buffer, list) or not all(isinstance(c, str) for c in buffer):
        raise UserError(f"the MDS buffer file {path}: 'buffer' must be a list of case identifiers; {select}.")
    return record


# ------------------------------------------------------------------------------------ phantom tasks


def write_task_phantoms(
    raw_root: str | os.PathLike,
    first_id: int,
    tasks: tuple[str, ...] = ("liver", "kidney", "spleen"),
    num_train: int = 12,
    num_test: int = 4,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    force: bool = False,
    profile: str = "standard",
) -> list[Path]:
    """A task sequence on phantoms: one binary nnU-Net raw dataset per structure (ids ``first_id``,
    ``first_id + 1``, ...; ``Dataset{id}_PhantomTask{Structure}``), each from its own phantom cases (seed
    ``seed + i``), all with the same shape and spacing so that they plan to the same network. Label 1 is
    the task's structure (from the ``full`` phantom's labels), everything else background. ``profile``: the
    phantom's image profile (``converge``: the convergence benchmarks); ``shape`` defaults to the profile's."""
    import json
    import shutil

    import SimpleITK as sitk

    from nnunet_ext.tools.phantoms import FULL_LABELS, PROFILE_SHAPES, PROFILES, write_phantom_dataset

    if profile not in PROFILES:
        raise UserError(f"unknown phantom profile {profile!r}; choose one of {list(PROFILES)}.")
    shape = PROFILE_SHAPES[profile] if shape is None else shape
    unknown = [t for t in tasks if t not in PHANTOM_TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown phantom tasks {unknown}; choose from {', '.join(PHANTOM_TASKS)}")
    raw_root = Path(raw_root).expanduser()
    names = {int(first_id) + i: f"PhantomTask{task.capitalize()}" for i, task in enumerate(tasks)}
    for dataset_id, name in names.items():  # every id refused before anything is written
        check_dataset_id_and_name(dataset_id, name)
        existing = existing_datasets_with_id(raw_root, dataset_id)
        if existing and not force:
            raise UserError(f"{existing[0]} exists (dataset id {dataset_id}); pass --force to replace it")
    written = []
    for i, (task, (dataset_id, name)) in enumerate(zip(tasks, names.items())):
        with RawDatasetWriter(raw_root, dataset_id, name, force) as writer:
            scratch = make_temp_dir(f".medseqft-{dataset_id}-", raw_root)  # the full phantom it is cut from
            try:
                sizes = dict(num_train=num_train, num_test=num_test, shape=shape)
                folder = write_phantom_dataset(
                    scratch, dataset_id, "full", name, **sizes, seed=seed + i, profile=profile
                )
                for sub in ("imagesTr", "imagesTs"):
                    for f in sorted((folder / sub).glob("*.nii.gz")):
                        writer.add_file(f, sub, f.name, "copy")
                for sub in ("labelsTr", "labelsTs"):
                    for f in sorted((folder / sub).glob("*.nii.gz")):
                        img = sitk.ReadImage(str(f))
                        arr = (sitk.GetArrayFromImage(img) == FULL_LABELS[task]).astype(np.uint8)
                        spacing = tuple(reversed(img.GetSpacing()))
                        writer.write_array(arr, sub, f.name, spacing, img.GetOrigin(), img.GetDirection())
                dj = json.loads((folder / "dataset.json").read_text())
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            dj["labels"] = {"background": 0, task: 1}
            dj["description"] = (
                f"MedSeqFT phantom task: {task} (binary) from the full phantom, seed {seed + i}, profile {profile}"
            )
            written.append(writer.finish(dj))
    return written


# ------------------------------------------------------------------------------------ CLI


def _cmd_select(args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else buffer_path(args.dataset, args.plans)
    existing_buffer(path, args.overwrite)  # a broken file there: refuse before minutes of scoring
    record = select_buffer(
        args.checkpoint,
        args.dataset,
        args.configuration,
        k=args.k,
        fraction=args.fraction,
        views=args.views,
        seed=args.seed,
        score=args.score,
        plans_identifier=args.plans,
        reference=args.reference,
        device=args.device,
        fold=args.fold,
    )
    write_buffer(record, path, args.overwrite)
    scores = record["scores"]
    print(
        f"MDS ({record['score']}, {record['views']} views, seed {record['seed']}): {len(scores)} training cases "
        f"of fold {record['fold']} scored"
    )
    for case in record["buffer"]:
        print(f"  buffer  {case}  {scores[case]:.5f}")
    rest = [c for c in scores if c not in record["buffer"]]
    if rest:
        print(f"  next    {rest[0]}  {scores[rest[0]]:.5f}")
    print(f"wrote {path}")
    return 0


def _cmd_phantoms(args: argparse.Namespace) -> int:
    out = args.out or os.environ.get("nnUNet_raw")
    if not out:
        raise UserError("no output folder: export nnUNet_raw=/path/to/nnUNet_raw or pass --out DIR")
    folders = write_task_phantoms(
        out,
        args.first_id,
        tuple(args.tasks),
        args.num_train,
        args.num_test,
        tuple(args.shape) if args.shape else None,
        args.seed,
        args.force,
        args.profile,
    )
    for f in folders:
        print(f"wrote {f}")
    ids = " ".join(str(args.first_id + i) for i in range(len(folders)))
    print(f"next: for d in {ids}; do nnUNetv2_plan_and_preprocess -d $d -c 3d_fullres; done")
    return 0


def dice_of(pred: np.ndarray, gt: np.ndarray, labels: list[int]) -> float:
    """Mean Dice over ``labels`` (NaN-skipping; NaN when every label is absent from both)."""
    from nnunet_ext.core.metrics import dice

    values = [dice(pred == lab, gt == lab) for lab in labels]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan
