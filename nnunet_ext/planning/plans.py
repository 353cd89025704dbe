"""Editing nnU-Net plans for new datasets: ``nnunet-ext plans ...``.

Every edit works on a copy, is validated as a whole (the edited configuration and every configuration
inheriting from it must still build a consistent network: one stride/kernel/feature entry per stage, a
patch the strides divide, finite values within :data:`LIMITS` unless forced, ...), and is written
atomically after the original plans file has been backed up (a read-only plans file only with force).
Nothing is written if anything fails. Configurations derived with ``inherits_from`` carry the WHOLE ``architecture`` dict whenever they
change it, because nnU-Net merges configurations shallowly.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from nnunet_ext.core.errors import UserError

DEFAULT_PLANS = "nnUNetPlans"
PER_STAGE_KEYS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage")
DECODER_KEYS = ("n_conv_per_stage_decoder",)
# ResEnc presets of nnU-Net use 1,3,4,6,6,6,... residual blocks per encoder stage
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)


# --------------------------------------------------------------------------------------------- files
def locate_plans(dataset: str, plans_identifier: str = DEFAULT_PLANS) -> Path:
    """Plans file of ``dataset`` (id, name, or a path to a plans .json) under nnUNet_preprocessed."""
    candidate = Path(dataset)
    if candidate.suffix == ".json":
        if not candidate.is_file():
            raise UserError(f"plans file {candidate} does not exist")
        return candidate
    from nnunet_ext.core.paths import resolve_dataset

    folder = resolve_dataset(dataset, "nnUNet_preprocessed")
    path = folder / f"{plans_identifier}.json"
    if not path.is_file():
        available = sorted(
            p.stem for p in folder.glob("*.json") if p.stem not in ("dataset", "dataset_fingerprint")
        )
        raise UserError(
            f"plans {plans_identifier!r} not found in {folder}. Available plans: "
            f"{', '.join(available) or 'none'} (choose with -p). "
            f"Run `nnUNetv2_plan_and_preprocess -d {folder.name}` if there are none."
        )
    return path


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


PLANS_FIX = "restore it from its backup (<file>.bak-*) or re-plan with nnUNetv2_plan_experiment"


def load_plans(path: Path) -> dict:
    """Read a plans file; refuse anything that is not an nnU-Net plans file (unreadable, not UTF-8,
    truncated, wrong JSON types) with one line naming the problem and the fix."""
    from nnunet_ext.core.io import read_json

    plans = read_json(path, "plans file", PLANS_FIX, expect=dict)
    configs = plans.get("configurations")
    if not isinstance(configs, dict):
        found = "no 'configurations'" if configs is None else f"'configurations' is {_json_type(configs)}"
        raise UserError(
            f"{path} is not an nnU-Net plans file ({found}, expected an object of configurations); pass the "
            f"plans .json of a dataset, or {PLANS_FIX}."
        )
    for name, cfg in configs.items():
        if not isinstance(cfg, dict):
            raise UserError(
                f"{path}: configuration {name!r} is {_json_type(cfg)}, not an object; {PLANS_FIX}."
            )
        parent = cfg.get("inherits_from")
        if parent is not None and not isinstance(parent, str):
            raise UserError(
                f"{path}: 'inherits_from' of configuration {name!r} is {_json_type(parent)}, not the name "
                f"of a configuration; {PLANS_FIX}."
            )
    return plans


def _is_read_only(path: Path) -> bool:
    try:
        return not (path.stat().st_mode & stat.S_IWUSR)
    except FileNotFoundError:
        return False


def save_plans(path: Path, plans: dict, force: bool = False) -> Path:
    """Back up ``path`` (``<name>.bak-<timestamp>``), then replace it atomically. Returns the backup.

    The replaced file keeps its permission bits (:mod:`nnunet_ext.core.io`). A read-only file (no write bit
    for its owner) is refused unless ``force``; it stays read-only when forced. If anything fails, the
    plans file is unchanged and no backup is left behind."""
    from nnunet_ext.core import io

    path = Path(path)
    if _is_read_only(path) and not force:
        raise UserError(
            f"{path} is read-only (mode {stat.S_IMODE(path.stat().st_mode):04o}); pass --force to replace "
            f"it anyway (it stays read-only; force=True from Python), or make it writable first "
            f"(chmod u+w)."
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        n += 1
    made_backup = False
    try:
        shutil.copy2(path, backup)
        made_backup = True
        io.atomic_write_json(path, plans)
    except OSError as e:
        if made_backup:
            backup.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path}: {e.strerror or e}. The plans file is unchanged; free disk space or make "
            f"{path.parent} writable, then rerun."
        ) from e
    return backup


def dataset_json_for(plans_path: Path) -> dict:
    from nnunet_ext.core.io import read_json

    path = Path(plans_path).parent / "dataset.json"
    if not path.is_file():
        raise UserError(f"no dataset.json beside {plans_path}; it is needed to know the channels and labels")
    return read_json(
        path, "dataset.json", "copy it again from the dataset's folder in nnUNet_raw", expect=dict
    )


# ----------------------------------------------------------------------------------- configurations
def resolve(plans: dict, name: str) -> dict:
    """The configuration with ``inherits_from`` resolved (a deep copy), as nnU-Net sees it."""
    configs = plans["configurations"]
    if name not in configs:
        raise UserError(
            f"configuration {name!r} is not in the plans. Available: {', '.join(configs)}. "
            "Add it with `nnunet-ext plans add` or pick another with -c."
        )
    chain, current = [], name
    while True:
        if current in chain:
            raise UserError(
                f"configuration {name!r} has circular inherits_from: {' -> '.join([*chain, current])}"
            )
        if current not in configs:
            raise UserError(
                f"configuration {chain[-1]!r} inherits from {current!r}, which is not in the plans"
            )
        chain.append(current)
        parent = configs[current].get("inherits_from")
        if parent is None:
            break
        current = parent
    resolved: dict = {}
    for cfg in reversed(chain):
        resolved.update(copy.deepcopy(configs[cfg]))
    resolved.pop("inherits_from", None)
    return resolved


def _prod(values) -> int:
    return math.prod(int(v) for v in values)


def stride_products(arch_kwargs: dict) -> list[int]:
    """Total downsampling factor per axis (product of all stage strides)."""
    strides = arch_kwargs["strides"]
    dim = len(strides[0]) if strides and isinstance(strides[0], (list, tuple)) else None
    if dim is None:
        raise UserError("architecture strides must be a list of per-axis lists, e.g. [[1,1,1],[2,2,2]]")
    return [_prod(s[a] for s in strides) for a in range(dim)]


# Values beyond these are almost certainly typos (a patch of 4096^3 voxels, a batch of 1e8); ``--force``
# (``force=True``) allows them. nnU-Net's own plans stay far below: patches of at most ~2-4 M voxels, batch
# sizes up to a few hundred for small 2D images, at most 320 (3D) / 512 (2D) features, 5-8 stages.
LIMITS = {
    "patch_axis": 2048,
    "patch_voxels": 512**3,
    "batch_size": 4096,
    "batch_voxels": 2**30,  # batch size x patch voxels: 4 GiB for one float32 input channel
    "features": 4096,
    "n_stages": 12,
    "spacing": (1e-6, 1e6),
}
CONFIGURATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(name) -> str:
    """Refuse configuration names that nnU-Net's folder names cannot carry (empty, '/', '__', ...)."""
    if not isinstance(name, str) or not CONFIGURATION_NAME.fullmatch(name) or "__" in name or len(name) > 100:
        raise UserError(
            f"configuration name {name!r} is not allowed: use up to 100 letters, digits, '_', '-' and '.', "
            "starting with a letter or digit and without '__' (nnU-Net joins trainer, plans and "
            "configuration with '__' in folder names), e.g. 3d_fullres_big"
        )
    return name


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_list(value) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def structure_problem(cfg: dict) -> str | None:
    """What makes a resolved configuration unusable as data (a key of the wrong JSON type), or None.

    Only types are checked here; values (lengths, signs, divisibility, limits) are :func:`validate`'s."""
    for key in ("patch_size", "batch_size", "spacing", "architecture"):
        if key not in cfg:
            return f"has no {key!r}; derive it from a complete configuration (inherits_from)"
    if not _int_list(cfg["patch_size"]):
        return f"patch_size {cfg['patch_size']!r} is not a list of integers"
    if not _is_int(cfg["batch_size"]):
        return f"batch_size {cfg['batch_size']!r} is not an integer"
    spacing = cfg["spacing"]
    if not isinstance(spacing, list) or not all(_is_number(s) for s in spacing):
        return f"spacing {spacing!r} is not a list of numbers"
    if "data_identifier" in cfg and not isinstance(cfg["data_identifier"], str):
        return f"data_identifier {cfg['data_identifier']!r} is not a string"
    arch = cfg["architecture"]
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("network_class_name"), str)
        or not isinstance(arch.get("arch_kwargs"), dict)
    ):
        return "'architecture' needs 'network_class_name' (a dotted class path) and 'arch_kwargs' (an object)"
    kw = arch["arch_kwargs"]
    if "n_stages" in kw and not _is_int(kw["n_stages"]):
        return f"n_stages {kw['n_stages']!r} is not an integer"
    for key in (*PER_STAGE_KEYS, *DECODER_KEYS):
        if (
            key in kw
            and key not in ("kernel_sizes", "strides")
            and not (_is_int(kw[key]) or _int_list(kw[key]))
        ):
            return f"{key} {kw[key]!r} is not an integer or a list of integers"
    for key in ("kernel_sizes", "strides"):
        if key in kw and not (isinstance(kw[key], list) and all(_int_list(e) for e in kw[key])):
            return f"{key} {kw[key]!r} is not a list of per-axis integer lists, e.g. [[1, 1, 1], [2, 2, 2]]"
    return None


def _check_structure(plans: dict, name: str) -> dict:
    cfg = resolve(plans, name)
    problem = structure_problem(cfg)
    if problem:
        raise UserError(
            f"configuration {name!r} is malformed in the plans: {problem}. Fix it in the plans file or "
            "restore the file from its backup (<file>.bak-*)"
        )
    return cfg


def _beyond_limits(cfg: dict) -> str | None:
    patch, batch = cfg["patch_size"], cfg["batch_size"]
    kw = cfg["architecture"]["arch_kwargs"]
    features = kw.get("features_per_stage")
    features = features if isinstance(features, list) else [features] if _is_int(features) else []
    low, high = LIMITS["spacing"]
    checks = [
        (
            max(patch) > LIMITS["patch_axis"],
            f"patch_size {patch} exceeds {LIMITS['patch_axis']} voxels on an axis",
        ),
        (
            _prod(patch) > LIMITS["patch_voxels"],
            f"patch_size {patch} has {_prod(patch):,} voxels (more than 512^3 = {LIMITS['patch_voxels']:,})",
        ),
        (batch > LIMITS["batch_size"], f"batch_size {batch} exceeds {LIMITS['batch_size']}"),
        (
            batch * _prod(patch) > LIMITS["batch_voxels"],
            f"batch_size {batch} x patch_size {patch} = {batch * _prod(patch):,} voxels per batch "
            f"(more than {LIMITS['batch_voxels']:,})",
        ),
        (
            any(f > LIMITS["features"] for f in features),
            f"features_per_stage {features} exceeds {LIMITS['features']} features",
        ),
        (
            kw.get("n_stages", 0) > LIMITS["n_stages"],
            f"n_stages {kw.get('n_stages')} exceeds {LIMITS['n_stages']}",
        ),
        (
            any(not low <= s <= high for s in cfg["spacing"]),
            f"spacing {cfg['spacing']} lies outside {low:g}..{high:g}",
        ),
    ]
    return next((what for bad, what in checks if bad), None)


def validate(plans: dict, name: str, force: bool = False) -> dict:
    """Check that configuration ``name`` describes a consistent network; return it resolved.

    Values beyond :data:`LIMITS` (almost certainly typos) are refused unless ``force``."""
    cfg = _check_structure(plans, name)
    where = f"configuration {name!r}"
    kw = cfg["architecture"]["arch_kwargs"]
    patch, spacing, batch = cfg["patch_size"], cfg["spacing"], cfg["batch_size"]
    dim = len(patch)
    if dim not in (2, 3):
        raise UserError(f"{where}: patch_size {patch} must have 2 or 3 entries")
    if not all(p > 0 for p in patch):
        raise UserError(f"{where}: patch_size {patch} must be positive integers")
    if batch < 1:
        raise UserError(f"{where}: batch_size {batch!r} must be an integer >= 1")
    if len(spacing) != dim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserError(
            f"{where}: spacing {spacing} must be {dim} finite positive numbers (one per patch axis)"
        )
    if "n_stages" in kw:
        n = kw["n_stages"]
        if n < 1:
            raise UserError(f"{where}: n_stages {n!r} must be an integer >= 1")
        for key in PER_STAGE_KEYS:
            if isinstance(kw.get(key), list) and len(kw[key]) != n:
                raise UserError(f"{where}: {key} has {len(kw[key])} entries but n_stages is {n}")
        for key in DECODER_KEYS:
            if isinstance(kw.get(key), list) and len(kw[key]) != n - 1:
                raise UserError(f"{where}: {key} has {len(kw[key])} entries but needs n_stages - 1 = {n - 1}")
        for key in ("features_per_stage", "n_conv_per_stage", "n_blocks_per_stage", *DECODER_KEYS):
            values = kw.get(key)
            values = values if isinstance(values, list) else [values] if values is not None else []
            if not all(v > 0 for v in values):
                raise UserError(f"{where}: {key} {kw[key]} must be positive integers")
        for key in ("kernel_sizes", "strides"):
            for entry in kw.get(key, []):
                if len(entry) != dim or not all(v > 0 for v in entry):
                    raise UserError(
                        f"{where}: every entry of {key} needs {dim} positive values (one per patch axis)"
                    )
    if not force:
        beyond = _beyond_limits(cfg)
        if beyond:
            raise UserError(
                f"{where}: {beyond}, beyond the limits that catch typos. Use a smaller value, or pass "
                "--force if you mean it (force=True from Python)"
            )
    if "n_stages" in kw and kw.get("strides"):
        products = stride_products(kw)
        bad = [a for a in range(dim) if patch[a] % products[a]]
        if bad:
            fixed = [max(products[a], round(patch[a] / products[a]) * products[a]) for a in range(dim)]
            raise UserError(
                f"{where}: patch_size {patch} is not divisible by the network's total stride {products} "
                f"on axis {', '.join(map(str, bad))}. Use e.g. --patch-size {' '.join(map(str, fixed))}"
            )
    return cfg


def descendants(plans: dict, name: str) -> list[str]:
    """The configurations that inherit from ``name``, directly or through others."""
    configs = plans["configurations"]
    found = []
    for other, cfg in configs.items():
        seen, current = {other}, cfg.get("inherits_from")
        while current in configs and current not in seen:
            if current == name:
                found.append(other)
                break
            seen.add(current)
            current = configs[current].get("inherits_from")
    return found


def validate_affected(before: dict, after: dict, name: str, force: bool = False) -> None:
    """Validate configuration ``name`` of the edited plans ``after`` and every configuration inheriting from
    it. A configuration that was valid in ``before`` and is not any more refuses the edit (nnU-Net merges
    ``inherits_from`` shallowly, so a parent's patch or strides can break a child that keeps its own)."""
    validate(after, name, force)
    for child in descendants(after, name):
        try:
            validate(after, child, force)
        except UserError as e:
            try:
                validate(before, child, force)
            except UserError:
                continue  # broken already before this edit: not its doing
            raise UserError(
                f"this edit of {name!r} would break {child!r}, which inherits from it ({str(e).rstrip('.')}). "
                f"Give {child!r} its own values first (`nnunet-ext plans set DATASET {child} ...`) or edit "
                f"{name!r} differently"
            ) from e


def _commit(plans: dict, work: dict) -> None:
    """Make the edited copy ``work`` the plans (edits work on a copy: a refused edit changes nothing)."""
    plans.clear()
    plans.update(work)


def _own_architecture(plans: dict, name: str) -> dict:
    """Make ``name`` carry its whole architecture dict (shallow merge!) and return it for editing."""
    own = plans["configurations"][name]
    if "architecture" not in own:
        own["architecture"] = copy.deepcopy(resolve(plans, name)["architecture"])
    return own["architecture"]


def _convert_kwargs(kw: dict, style: str) -> dict:
    kw = copy.deepcopy(kw)
    n = kw["n_stages"]
    if style == "resenc" and "n_blocks_per_stage" not in kw:
        kw.pop("n_conv_per_stage", None)
        kw["n_blocks_per_stage"] = list(RESENC_BLOCKS[:n]) + [RESENC_BLOCKS[-1]] * max(
            0, n - len(RESENC_BLOCKS)
        )
        kw["n_conv_per_stage_decoder"] = [1] * (n - 1)
    elif style == "plain" and "n_conv_per_stage" not in kw:
        kw.pop("n_blocks_per_stage", None)
        kw["n_conv_per_stage"] = [2] * n
        kw["n_conv_per_stage_decoder"] = [2] * (n - 1)
    return kw


def architecture_spec(name_or_path: str):
    from nnunet_ext.architectures import ARCHITECTURES

    if name_or_path in ARCHITECTURES:
        return ARCHITECTURES[name_or_path]
    for spec in ARCHITECTURES.values():
        if spec.network_class_name == name_or_path:
            return spec
    raise UserError(
        f"unknown architecture {name_or_path!r}. Known: {', '.join(ARCHITECTURES)} "
        "(see `nnunet-ext plans archs`)"
    )


@dataclass
class EditReport:
    """What an edit did, for the user."""

    lines: list[str] = field(default_factory=list)
    needs_preprocessing: list[str] = field(default_factory=list)  # configurations with new data_identifier

    def add(self, line: str) -> None:
        self.lines.append(line)


def add_configuration(
    plans: dict,
    name: str,
    parent: str,
    arch: str | None = None,
    force: bool = False,
    report: EditReport | None = None,
) -> None:
    """Add configuration ``name`` inheriting from ``parent``, optionally swapping in architecture ``arch``.

    ``force`` replaces an existing configuration of that name and allows values beyond :data:`LIMITS`.
    Works on a copy: a refused edit leaves ``plans`` unchanged."""
    report = report if report is not None else EditReport()
    check_name(name)
    configs = plans["configurations"]
    if name in configs and not force:
        raise UserError(f"configuration {name!r} already exists in the plans; pass --force to replace it")
    if name == parent:
        raise UserError(f"a configuration cannot inherit from itself ({name!r}); choose another name")
    parent_cfg = _check_structure(plans, parent)
    work = copy.deepcopy(plans)
    child: dict = {"inherits_from": parent}
    if arch is not None:
        spec = architecture_spec(arch)
        kw = parent_cfg["architecture"]["arch_kwargs"]
        if spec.kwargs != "any":
            if not _is_int(kw.get("n_stages")):
                raise UserError(
                    f"configuration {parent!r} has no n_stages in its arch_kwargs, so its kwargs cannot be "
                    f"converted for {spec.name}; derive from a U-Net configuration such as 3d_fullres"
                )
            kw = _convert_kwargs(kw, spec.kwargs)
        child["architecture"] = {
            **copy.deepcopy(parent_cfg["architecture"]),
            "network_class_name": spec.network_class_name,
            "arch_kwargs": kw,
        }
        report.add(f"{name}: architecture {spec.name} ({spec.network_class_name}) with {parent}'s kwargs")
    work["configurations"][name] = child
    report.add(f"{name}: inherits_from {parent}")
    validate_affected(plans, work, name, force)
    _commit(plans, work)


def _stride_for_new_stage(patch: list[int], products: list[int]) -> list[int]:
    # downsample an axis while at least 8 voxels would remain there at the new bottleneck
    return [2 if patch[a] // (products[a] * 2) >= 4 else 1 for a in range(len(patch))]


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{flag} must be >= 1 (got {value})")


def edit_configuration(
    plans: dict,
    name: str,
    *,
    patch_size: list[int] | None = None,
    batch_size: int | None = None,
    spacing: list[float] | None = None,
    features: list[int] | None = None,
    base_features: int | None = None,
    max_features: int | None = None,
    n_stages: int | None = None,
    force: bool = False,
    report: EditReport | None = None,
) -> None:
    """Change one configuration (see ``nnunet-ext plans set --help``). The edited configuration and every
    configuration inheriting from it are validated; values beyond :data:`LIMITS` need ``force``. Works on
    a copy: a refused edit leaves ``plans`` unchanged."""
    report = report if report is not None else EditReport()
    cfg = _check_structure(plans, name)
    work = copy.deepcopy(plans)
    own = work["configurations"][name]
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1 (got {batch_size})")
        own["batch_size"] = int(batch_size)
        report.add(f"{name}: batch_size {cfg['batch_size']} -> {batch_size}")
    if patch_size is not None:
        if len(patch_size) != len(cfg["patch_size"]):
            raise UserError(f"{name} is {len(cfg['patch_size'])}d: give {len(cfg['patch_size'])} patch sizes")
        if any(p < 1 for p in patch_size):
            raise UserError(f"--patch-size must be positive integers (got {' '.join(map(str, patch_size))})")
        own["patch_size"] = [int(p) for p in patch_size]
        report.add(f"{name}: patch_size {cfg['patch_size']} -> {own['patch_size']}")
    if spacing is not None:
        if len(spacing) != len(cfg["spacing"]) or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise UserError(
                f"--spacing must be {len(cfg['spacing'])} finite positive numbers "
                f"(got {' '.join(map(str, spacing))})"
            )
        own["spacing"] = [float(s) for s in spacing]
        report.add(f"{name}: spacing {cfg['spacing']} -> {own['spacing']}")
        identifier = cfg.get("data_identifier")
        if own.get("data_identifier", identifier) == identifier and own["spacing"] != list(cfg["spacing"]):
            own["data_identifier"] = f"{plans.get('plans_name', DEFAULT_PLANS)}_{name}"
            report.add(
                f"{name}: data_identifier -> {own['data_identifier']} (new spacing needs its own data)"
            )
        report.needs_preprocessing.append(name)
    if n_stages is not None or features is not None or base_features is not None or max_features is not None:
        kw = cfg["architecture"]["arch_kwargs"]
        missing = [k for k in ("n_stages", "strides", "kernel_sizes", "features_per_stage") if k not in kw]
        if missing or not isinstance(kw["features_per_stage"], list):
            raise UserError(
                f"the architecture of {name!r} has no per-stage lists ({', '.join(missing) or 'features_per_stage'}"
                "); --n-stages and the --*features options edit nnU-Net U-Net kwargs only"
            )
        arch = _own_architecture(work, name)
        kw = arch["arch_kwargs"]
        if n_stages is not None:
            _set_n_stages(kw, n_stages, own.get("patch_size", cfg["patch_size"]), report, name)
        n = kw["n_stages"]
        if features is not None:
            if len(features) != n:
                raise UserError(f"--features needs one value per stage: {n} values (got {len(features)})")
            if any(f < 1 for f in features):
                raise UserError(f"--features must be positive integers (got {' '.join(map(str, features))})")
            kw["features_per_stage"] = [int(f) for f in features]
        elif base_features is not None or max_features is not None:
            old = kw["features_per_stage"]
            base = base_features if base_features is not None else old[0]
            cap = max_features if max_features is not None else max(old)
            if base < 1 or cap < 1:
                raise UserError("--base-features and --max-features must be >= 1")
            if base > cap:
                raise UserError(
                    f"--base-features {base} exceeds the cap of {cap} ("
                    + ("--max-features" if max_features is not None else "the largest current stage")
                    + f"), so every stage would get {cap}; lower --base-features or raise --max-features"
                )
            kw["features_per_stage"] = [min(base * 2**i, cap) for i in range(n)]
        if features is not None or base_features is not None or max_features is not None:
            report.add(f"{name}: features_per_stage -> {kw['features_per_stage']}")
    validate_affected(plans, work, name, force)
    _commit(plans, work)


def _set_n_stages(kw: dict, n: int, patch: list[int], report: EditReport, name: str) -> None:
    old = kw["n_stages"]
    if n < 1:
        raise UserError(f"--n-stages must be >= 1 (got {n})")
    if n < old:
        for key in PER_STAGE_KEYS:
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][:n]
        for key in DECODER_KEYS:
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][: n - 1]
    while kw.get("n_stages", old) < n or len(kw["strides"]) < n:
        products = stride_products(kw)
        stride = _stride_for_new_stage(patch, products)
        if not any(s > 1 for s in stride):
            raise UserError(
                f"cannot add stage {len(kw['strides']) + 1}: patch {patch} is too small to downsample again "
                f"(total stride already {products}). Enlarge the patch first (--patch-size)."
            )
        kw["strides"].append(stride)
        kw["kernel_sizes"].append([3] * len(patch))
        kw["features_per_stage"].append(
            min(kw["features_per_stage"][-1] * 2, max(kw["features_per_stage"] + [320]))
        )
        for key in ("n_conv_per_stage", "n_blocks_per_stage"):
            if isinstance(kw.get(key), list):
                kw[key].append(kw[key][-1])
        for key in DECODER_KEYS:
            if isinstance(kw.get(key), list):
                kw[key].append(kw[key][-1] if kw[key] else 2)
        kw["n_stages"] = len(kw["strides"])
    kw["n_stages"] = n
    report.add(f"{name}: n_stages {old} -> {n} (strides {kw['strides']})")


def tiny_configuration(
    plans: dict,
    parent: str = "3d_fullres",
    name: str | None = None,
    *,
    max_stages: int = 4,
    base_features: int = 8,
    max_features: int = 64,
    max_voxels: int = 24 * 48 * 48,
    batch_size: int = 2,
    force: bool = False,
    report: EditReport | None = None,
) -> str:
    """Add a configuration that trains in minutes on 2 CPU cores, derived from ``parent``.

    Few stages (the parent's first ``max_stages``), few features, a patch of at most ``max_voxels``
    voxels that the remaining strides divide, and the parent's spacing and ``data_identifier``, so the
    parent's preprocessed data are reused (no new preprocessing).
    """
    report = report if report is not None else EditReport()
    name = ("3d_tiny" if parent.startswith("3d") else f"{parent}_tiny") if name is None else name
    for option, value in (
        ("max_stages", max_stages),
        ("base_features", base_features),
        ("max_features", max_features),
        ("max_voxels", max_voxels),
        ("batch_size", batch_size),
    ):
        if not _is_int(value) or value < 1:
            raise UserError(f"tiny: {option} must be an integer >= 1 (got {value!r})")
    cfg = _check_structure(plans, parent)
    kw = cfg["architecture"]["arch_kwargs"]
    if not _is_int(kw.get("n_stages")) or not kw.get("strides"):
        raise UserError(
            f"configuration {parent!r} has no n_stages/strides in its arch_kwargs; derive the tiny "
            "configuration from a U-Net configuration such as 3d_fullres (--from)"
        )
    work = copy.deepcopy(plans)
    add_configuration(work, name, parent, force=force, report=report)
    n = min(kw["n_stages"], max_stages)
    products = [_prod(s[a] for s in kw["strides"][:n]) for a in range(len(cfg["patch_size"]))]
    patch = [max(products[a], (p // products[a]) * products[a]) for a, p in enumerate(cfg["patch_size"])]
    while _prod(patch) > max_voxels:
        shrinkable = [a for a in range(len(patch)) if patch[a] > products[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: patch[a])
        patch[axis] -= products[axis]
    work["configurations"][name]["patch_size"] = patch
    work["configurations"][name]["batch_size"] = batch_size
    edit_configuration(
        work,
        name,
        n_stages=n,
        base_features=base_features,
        max_features=max_features,
        force=force,
        report=report,
    )
    _commit(plans, work)
    report.add(f"{name}: patch_size {patch}, batch_size {batch_size} (reuses {parent}'s preprocessed data)")
    return name


# ------------------------------------------------------------------------------------------- presets
def list_presets() -> dict[str, dict]:
    presets = {}
    for entry in resources.files("nnunet_ext.presets").iterdir():
        if entry.name.endswith(".json"):
            presets[entry.name[: -len(".json")]] = json.loads(entry.read_text())
    return dict(sorted(presets.items()))


def apply_preset(
    plans: dict, preset: str | dict, force: bool = False, report: EditReport | None = None
) -> EditReport:
    """Apply a preset (name of a file in plans/ or a dict with ``steps``) to ``plans`` in place; every step
    or none (a refused step leaves ``plans`` unchanged). ``force`` replaces configurations the preset adds
    and allows values beyond :data:`LIMITS`."""
    report = report if report is not None else EditReport()
    work = copy.deepcopy(plans)
    if isinstance(preset, str):
        presets = list_presets()
        if preset not in presets:
            raise UserError(
                f"unknown preset {preset!r}. Available: {', '.join(presets)} (`nnunet-ext plans presets`)"
            )
        preset = presets[preset]
    for i, step in enumerate(preset.get("steps", [])):
        step = dict(step)
        op = step.pop("op", None)
        parent = step.get("from", step.get("configuration"))
        if step.pop("optional", False) and parent not in work["configurations"]:
            report.add(f"skipped step {i + 1} ({op}): these plans have no {parent!r} configuration")
            continue
        try:
            if op == "add":
                add_configuration(
                    work, step.pop("name"), step.pop("from"), step.pop("arch", None), force, report
                )
            elif op == "set":
                edit_configuration(work, step.pop("configuration"), force=force, report=report, **step)
                step = {}
            elif op == "tiny":
                tiny_configuration(
                    work,
                    step.pop("from", "3d_fullres"),
                    step.pop("name", None),
                    force=force,
                    report=report,
                    **step,
                )
                step = {}
            else:
                raise UserError(f"unknown op {op!r} (use add, set or tiny)")
        except (KeyError, TypeError) as e:
            raise UserError(f"preset step {i + 1} ({op}) is malformed: {e}") from e
        if step:
            raise UserError(f"preset step {i + 1} ({op}) has unknown keys: {', '.join(step)}")
    _commit(plans, work)
    return report


# --------------------------------------------------------------------------------------------- check
def check_configuration(
    plans: dict,
    dataset_json: dict,
    name: str,
    device: str = "auto",
    trainer: str | None = None,
    batch_size: int | None = None,
    iterations: int = 2,
    force: bool = False,
) -> dict:
    """Build the configuration's network, time forward+backward at its patch and batch size (or
    ``batch_size``). Sizes beyond :data:`LIMITS` need ``force``."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise UserError(f"--batch-size must be an integer >= 1 (got {batch_size!r})")
    if not _is_int(iterations) or iterations < 1:
        raise UserError(f"--iterations must be an integer >= 1 (got {iterations!r})")
    from nnunet_ext.core.inference import torch_device

    dev = torch_device(device)
    plans = copy.deepcopy(plans)
    if batch_size is not None:
        if "batch_size" not in plans["configurations"].get(name, {}):
            _check_structure(plans, name)  # a clear error for an unknown or incomplete configuration
        plans["configurations"][name]["batch_size"] = batch_size
    validate(plans, name, force)
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(name)
    try:
        label_manager = plans_manager.get_label_manager(dataset_json)
        n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
    except (KeyError, TypeError, AssertionError) as e:
        raise UserError(f"dataset.json is malformed ({e!r}): it needs 'channel_names' and 'labels'") from e
    n_out = label_manager.num_segmentation_heads
    build = _network_builder(trainer, plans_manager, cm, n_in, n_out)
    arch = cm.network_arch_class_name
    try:
        network = build().to(dev)
    except ImportError as e:
        raise UserError(
            f"network class {arch!r} of configuration {name!r} cannot be imported ({e}). "
            "Fix 'network_class_name' in the plans (a dotted path), or install the package that provides it."
        ) from e
    except TypeError as e:
        raise UserError(
            f"network {arch} rejected the configuration's arch_kwargs: {e}. "
            "Fix 'arch_kwargs' in the plans (`nnunet-ext plans show` lists them)."
        ) from e
    except RuntimeError as e:
        raise UserError(
            f"building the network of {name} on {dev} failed: {str(e).splitlines()[0]}. "
            "Use fewer features or stages, or another --device."
        ) from e
    bs = cm.batch_size
    params = sum(p.numel() for p in network.parameters())
    network.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    try:
        x = torch.randn((bs, n_in, *cm.patch_size), device=dev)
        for _ in range(iterations + 1):  # the first iteration is warm-up
            start = time.perf_counter()
            out = network(x)
            loss = sum(o.float().mean() for o in _flatten(out))
            loss.backward()
            network.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
    except RuntimeError as e:
        raise UserError(
            f"forward/backward of {name} failed at patch {cm.patch_size}, batch {bs}: {str(e).splitlines()[0]}. "
            "Check patch size, strides and kernel sizes (`nnunet-ext plans show`)."
        ) from e
    result = {
        "configuration": name,
        "network": arch if trainer is None else f"{trainer}.build_network_architecture",
        "device": str(dev),
        "patch_size": list(cm.patch_size),
        "batch_size": bs,
        "input_channels": n_in,
        "outputs": n_out,
        "parameters": params,
        "seconds_per_iteration": sum(times[1:]) / max(1, len(times) - 1),
        "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
    return result


def _flatten(out):
    if isinstance(out, (list, tuple)):
        for o in out:
            yield from _flatten(o)
    else:
        yield out


def _network_builder(trainer, plans_manager, cm, n_in, n_out):
    if trainer is None:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        return lambda: get_network_from_plans(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            n_in,
            n_out,
            allow_init=True,
            deep_supervision=True,
        )
    from nnunet_ext.core.nnunet_commands import find_trainer

    cls = find_trainer(trainer)
    return lambda: cls.build_network_architecture(plans_manager, cm, n_in, n_out, True)


# ----------------------------------------------------------------------------------------------- CLI
def _describe(plans: dict, name: str) -> str:
    try:
        cfg = resolve(plans, name)
        kw = cfg["architecture"]["arch_kwargs"]
        arch = cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1]
        parent = plans["configurations"][name].get("inherits_from")
        return (
            f"{name:<22} {arch:<22} stages {kw.get('n_stages', '?'):<2} features {kw.get('features_per_stage')} "
            f"patch {cfg['patch_size']} batch {cfg['batch_size']} spacing {[round(s, 3) for s in cfg['spacing']]}"
            + (f"  (inherits {parent})" if parent else "")
        )
    except (UserError, KeyError, TypeError, AttributeError) as e:
        return f"{name:<22} (incomplete: {e})"


def _write(
    path: Path, plans: dict, report: EditReport, dataset_hint: str, plans_id: str, force: bool = False
) -> None:
    backup = save_plans(path, plans, force=force)
    for line in report.lines:
        print(f"  {line}")
    print(f"wrote {path} (backup: {backup.name})")
    for cfg in dict.fromkeys(report.needs_preprocessing):
        print(f"next: nnUNetv2_preprocess -d {dataset_hint} -c {cfg} -plans_name {plans_id}")


def _dataset_hint(path: Path) -> str:
    name = path.parent.name
    return str(int(name[7:10])) if name.startswith("Dataset") and name[7:10].isdigit() else name


def _cmd_show(args):
    path = locate_plans(args.dataset, args.plans)
    plans = load_plans(path)
    print(f"{path}")
    names = [args.configuration] if args.configuration else list(plans["configurations"])
    for name in names:
        if args.configuration:
            print(json.dumps(resolve(plans, name), indent=2))
        else:
            print("  " + _describe(plans, name))


def _cmd_add(args):
    path = locate_plans(args.dataset, args.plans)
    plans = load_plans(path)
    report = EditReport()
    add_configuration(plans, args.name, args.parent, args.arch, args.force, report)
    _write(path, plans, report, _dataset_hint(path), args.plans, args.force)
    print("  " + _describe(plans, args.name))


def _cmd_set(args):
    path = locate_plans(args.dataset, args.plans)
    plans = load_plans(path)
    report = EditReport()
    edit_configuration(
        plans,
        args.configuration,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        spacing=args.spacing,
        features=args.features,
        base_features=args.base_features,
        max_features=args.max_features,
        n_stages=args.n_stages,
        force=args.force,
        report=report,
    )
    if not report.lines:
        raise UserError(
            "nothing to change: give at least one of --patch-size, --batch-size, --spacing, "
            "--features, --base-features, --max-features, --n-stages"
        )
    _write(path, plans, report, _dataset_hint(path), args.plans, args.force)
    print("  " + _describe(plans, args.configuration))


def _cmd_tiny(args):
    path = locate_plans(args.dataset, args.plans)
    plans = load_plans(path)
    report = EditReport()
    name = tiny_configuration(plans, args.parent, args.name, force=args.force, report=report)
    _write(path, plans, report, _dataset_hint(path), args.plans, args.force)
    print("  " + _describe(plans, name))
    print(
        f"next: nnUNetv2_train {_dataset_hint(path)} {name} 0 -p {args.plans} -tr nnUNetTrainer_demo -device cpu"
    )


def _cmd_presets(args):
    for name, preset in list_presets().items():
        print(f"{name:<16} {preset.get('description', '')}")


def _cmd_apply(args):
    path = locate_plans(args.dataset, args.plans)
    plans = load_plans(path)
    report = apply_preset(plans, args.preset, force=args.force)
    _write(path, plans, report, _dataset_hint(path), args.plans, args.force)


def _cmd_archs(args):
    from nnunet_ext.architectures import ARCHITECTURES

    for spec in ARCHITECTURES.values():
        print(f"{spec.name:<22} {spec.network_class_name:<70} {spec.description}")


def _cmd_check(args):
    path = locate_plans(args.dataset, args.plans)
    plans = load_plans(path)
    r = check_configuration(
        plans,
        dataset_json_for(path),
        args.configuration,
        args.device,
        args.trainer,
        args.batch_size,
        args.iterations,
        args.force,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return
    mem = (
        f"{r['peak_memory_mb']:.0f} MiB peak" if r["peak_memory_mb"] is not None else "peak memory n/a on CPU"
    )
    print(
        f"{r['configuration']}: {r['network']} on {r['device']}\n"
        f"  input {r['input_channels']} ch, {r['outputs']} outputs, patch {r['patch_size']}, batch {r['batch_size']}\n"
        f"  {r['parameters'] / 1e6:.3f} M parameters, {r['seconds_per_iteration']:.3f} s per forward+backward, {mem}"
    )


def add_parser(sub) -> None:
    from nnunet_ext.core.nnunet_commands import count_arg, device_arg

    plans = sub.add_parser(
        "plans",
        help="edit nnU-Net plans: derive configurations, swap architectures, tiny preset, check",
        description="Edit a dataset's plans (nnUNet_preprocessed/DatasetXXX/<plans>.json). DATASET is an id, a "
        "dataset name or a path to a plans .json. Every edit is validated, the plans file is backed up "
        "(<file>.bak-<time>) and rewritten atomically.",
    )
    ps = plans.add_subparsers(dest="plans_command", metavar="ACTION")
    ps.required = True

    def common(p, configuration=False):
        p.add_argument("dataset", help="dataset id, name, or path to a plans .json file")
        if configuration:
            p.add_argument("configuration", help="configuration name, e.g. 3d_fullres")
        p.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier (default: nnUNetPlans)")

    p = ps.add_parser("show", help="list configurations (or print one resolved)")
    common(p)
    p.add_argument("-c", "--configuration", help="print this configuration fully resolved")
    p.set_defaults(func=_cmd_show)

    p = ps.add_parser(
        "add",
        help="add a configuration derived from another (inherits_from), optionally with another architecture",
    )
    common(p)
    p.add_argument("name", help="new configuration name, e.g. 3d_fullres_banet")
    p.add_argument(
        "--from", dest="parent", default="3d_fullres", help="parent configuration (default 3d_fullres)"
    )
    p.add_argument(
        "--arch", help="architecture to swap in (`nnunet-ext plans archs`), kwargs taken from the parent"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing configuration of that name; also allows values beyond the typo limits and replacing a read-only plans file",
    )
    p.set_defaults(func=_cmd_add)

    p = ps.add_parser("set", help="change patch/batch size, spacing, features or stages of a configuration")
    common(p, configuration=True)
    p.add_argument("--patch-size", type=int, nargs="+", metavar="N", help="patch size, one value per axis")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="target spacing; needs new preprocessing (a new data_identifier is set)",
    )
    p.add_argument(
        "--features", type=int, nargs="+", metavar="F", help="features per stage, one value per stage"
    )
    p.add_argument("--base-features", type=int, help="features of the first stage, doubled per stage")
    p.add_argument("--max-features", type=int, help="cap for --base-features doubling")
    p.add_argument("--n-stages", type=int, help="number of resolution stages (truncates or adds stages)")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow values beyond the limits that catch typos (see docs/plans.md) and replace a read-only "
        "plans file",
    )
    p.set_defaults(func=_cmd_set)

    p = ps.add_parser("tiny", help="add a tiny configuration that trains in minutes on 2 CPU cores")
    common(p)
    p.add_argument(
        "--from", dest="parent", default="3d_fullres", help="parent configuration (default 3d_fullres)"
    )
    p.add_argument("--name", help="name (default 3d_tiny, or <parent>_tiny for 2d)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing configuration of that name; also allows values beyond the typo limits and replacing a read-only plans file",
    )
    p.set_defaults(func=_cmd_tiny)

    p = ps.add_parser("check", help="build a configuration's network and time one forward+backward pass")
    common(p, configuration=True)
    p.add_argument(
        "-device",
        "--device",
        type=device_arg,
        default="auto",
        help="cpu, cuda, cuda:1 or auto (default: cuda if available)",
    )
    p.add_argument(
        "-tr", "--trainer", help="build the network the way this trainer does (e.g. nnUNetTrainerBANet)"
    )
    p.add_argument("--batch-size", type=count_arg(1), help="override the configuration's batch size")
    p.add_argument(
        "--iterations", type=count_arg(1), default=2, help="timed iterations after one warm-up (default 2)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--force",
        action="store_true",
        help="run even with a patch or batch beyond the limits that catch typos",
    )
    p.set_defaults(func=_cmd_check)

    p = ps.add_parser("presets", help="list the plan presets shipped in plans/")
    p.set_defaults(func=_cmd_presets)

    p = ps.add_parser("apply", help="apply a plan preset (`nnunet-ext plans presets`) to a dataset's plans")
    common(p)
    p.add_argument("preset", help="preset name")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace configurations the preset adds if they exist; also allows values beyond the typo "
        "limits and replacing a read-only plans file",
    )
    p.set_defaults(func=_cmd_apply)

    p = ps.add_parser("archs", help="list the architectures --arch accepts")
    p.set_defaults(func=_cmd_archs)
