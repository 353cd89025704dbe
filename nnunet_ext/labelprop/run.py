"""``nnunet-ext labelprop run``: the whole label-propagation recipe on the stock nnU-Net commands, resumable.

Steps (dataset ids ``N = --out-id``)::

    interpolate SOURCE -> Dataset N           (nnunet_ext.labelprop.propagate.interpolate_dataset)
    nnUNetv2_plan_and_preprocess -d N         (+ the 3d_tiny configuration when -c 3d_tiny, + --plans-preset's)
    nnUNetv2_train N CFG f -tr TRAINER_A      for every fold f            (model A)
    round r = 1 .. R:
        pseudo SOURCE with the previous model (ensemble of the folds) -> Dataset N + r
        nnUNetv2_extract_fingerprint, nnUNetv2_move_plans_between_datasets (N's plans), nnUNetv2_preprocess
        nnUNetv2_train N + r CFG f -tr TRAINER_B   for every fold f       (model B of round r)

A JSON state file records the options and every finished step. Rerunning the same command skips finished
steps, resumes an interrupted training with ``--c`` and replaces a dataset whose writing was interrupted.
Rerunning with other options is refused (``--restart`` discards the state).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import atomic_write_json

__all__ = ["RecipeOptions", "run_recipe", "recipe_steps", "default_state_file"]

STATE_VERSION = 1


@dataclass
class RecipeOptions:
    source: str
    out_id: int
    rounds: int = 1
    method: str | None = None  # None: nnunet_ext.labelprop.propagate.DEFAULT_METHOD
    outside: str = "ignore"
    axis: str | None = None
    annotated_slices: str | None = None
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    planner: str | None = None
    trainer_a: str = "nnUNetTrainerLabelPropA"
    trainer_b: str = "nnUNetTrainerLabelPropB"
    folds: tuple[str, ...] = ("0", "1", "2", "3")
    device: str = "auto"
    num_processes: int = 2
    tta: bool = True
    qc_cases: int = 3
    name: str | None = None
    plans_preset: str | None = None  # a preset of plans/ applied to the first dataset's plans after planning

    def recorded(self) -> dict:
        """The options that define the run (a resumed run must use the same)."""
        keys = (
            "source out_id rounds method outside axis annotated_slices configuration plans planner trainer_a "
            "trainer_b folds tta name"
        ).split()
        out = {k: getattr(self, k) for k in keys}
        out["folds"] = list(self.folds)
        if self.plans_preset is not None:  # recorded only when set: state files from before it still resume
            out["plans_preset"] = self.plans_preset
        return out


def _exe(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def default_state_file(out_id: int) -> Path:
    from nnunet_ext.core.paths import require_folder_var

    return require_folder_var("nnUNet_results") / "labelprop_runs" / f"run_{int(out_id):03d}.json"


def recipe_steps(opts: RecipeOptions) -> list[dict]:
    """The ordered steps of the recipe (each a dict with 'key', 'kind' and its parameters)."""
    steps: list[dict] = []
    n = int(opts.out_id)
    steps.append({"key": f"interpolate:{n}", "kind": "interpolate", "dataset": n})
    steps.append({"key": f"preprocess:{n}", "kind": "preprocess", "dataset": n})
    for f in opts.folds:
        steps.append(
            {
                "key": f"train:{n}:{opts.trainer_a}:{f}",
                "kind": "train",
                "dataset": n,
                "trainer": opts.trainer_a,
                "fold": f,
            }
        )
    for r in range(1, int(opts.rounds) + 1):
        prev_trainer = opts.trainer_a if r == 1 else opts.trainer_b
        steps.append(
            {
                "key": f"pseudo:{n + r}",
                "kind": "pseudo",
                "dataset": n + r,
                "model_dataset": n + r - 1,
                "model_trainer": prev_trainer,
            }
        )
        steps.append({"key": f"preprocess:{n + r}", "kind": "preprocess", "dataset": n + r, "plans_from": n})
        for f in opts.folds:
            steps.append(
                {
                    "key": f"train:{n + r}:{opts.trainer_b}:{f}",
                    "kind": "train",
                    "dataset": n + r,
                    "trainer": opts.trainer_b,
                    "fold": f,
                }
            )
    return steps


class _State:
    def __init__(self, path: Path, opts: RecipeOptions, restart: bool):
        self.path = path
        recorded = opts.recorded()
        if path.is_file() and not restart:
            from nnunet_ext.core.io import read_json

            data = read_json(
                path,
                "the labelprop run's state file",
                "pass --restart to start the run over (with --force to replace its datasets), or use --state",
            )
            if data.get("options") != recorded:
                diff = [
                    f"{k}: {data.get('options', {}).get(k)!r} -> {v!r}"
                    for k, v in recorded.items()
                    if data.get("options", {}).get(k) != v
                ]
                raise UserError(
                    f"{path} records a run of dataset id {opts.out_id} with other options ({'; '.join(diff)}). "
                    f"Rerun with the recorded options to resume, or pass --restart to start over (with --force "
                    f"to replace its datasets), or use another --out-id / --state."
                )
            self.data = data
        else:  # written by the first step that starts: a refused run leaves no state file behind
            self.data = {"version": STATE_VERSION, "options": recorded, "done": {}, "started": []}

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def done(self, key: str) -> bool:
        return key in self.data["done"]

    def started(self, key: str) -> bool:
        return key in self.data["started"]

    def start(self, key: str) -> None:
        if key not in self.data["started"]:
            self.data["started"].append(key)
            self.save()

    def finish(self, key: str, seconds: float) -> None:
        self.data["done"][key] = {
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.save()


def _dataset_folder(dataset_id: int) -> Path | None:
    from nnunet_ext.core.datasets import existing_datasets_with_id
    from nnunet_ext.core.paths import require_folder_var

    found = existing_datasets_with_id(require_folder_var("nnUNet_raw"), dataset_id)
    return found[0] if found else None


def _model_dir(dataset_id: int, trainer: str, opts: RecipeOptions) -> Path:
    from nnunet_ext.core.paths import require_folder_var

    folder = _dataset_folder(dataset_id)
    name = folder.name if folder is not None else f"Dataset{dataset_id:03d}"
    return require_folder_var("nnUNet_results") / name / f"{trainer}__{opts.plans}__{opts.configuration}"


def _run(cmd: list[str], env: dict, log, lock=None) -> None:
    from nnunet_ext.core.nnunet_commands import child_process

    log(f"$ {' '.join(cmd)}")
    sys.stdout.flush()
    with child_process(cmd, env, lock) as proc:
        pass
    if proc.returncode != 0:
        raise UserError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see its output above. Fix the cause and rerun "
            f"the same `nnunet-ext labelprop run` command: finished steps are skipped."
        )


def _preprocess(dataset_id: int, opts: RecipeOptions, log, plans_from: int | None = None, lock=None) -> None:
    """Plan and preprocess the first dataset (``nnUNetv2_extract_fingerprint``, its foreground statistics without
    the ignore label, ``nnUNetv2_plan_and_preprocess``, + 3d_tiny when asked); later
    rounds reuse its plans unchanged (``nnUNetv2_extract_fingerprint``, ``nnUNetv2_move_plans_between_datasets``,
    ``nnUNetv2_preprocess``), so models A and B share patch size, spacing and network."""
    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    env = ext_trainer_env()
    if env.get("nnUNet_n_proc_DA", "1").strip() in ("0", ""):
        env.pop("nnUNet_n_proc_DA")  # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA)
    tiny = opts.configuration == "3d_tiny"
    # the configuration nnU-Net plans and preprocesses: 3d_tiny and a preset's own configurations reuse 3d_fullres's data
    stock = opts.configuration in ("2d", "3d_fullres", "3d_lowres")
    cfg = "3d_fullres" if tiny or (opts.plans_preset and not stock) else opts.configuration
    n_proc = str(opts.num_processes)
    if plans_from is not None:
        from nnunet_ext.core.nnunet_commands import preprocess_with_plans_of

        preprocess_with_plans_of(
            plans_from, dataset_id, env, lambda cmd: _run(cmd, env, log, lock), plans=opts.plans,
            configuration=cfg, num_processes=opts.num_processes, fix="rewrite it or rerun with --restart --force",
        )  # fmt: skip
        return
    # the fingerprint first, then its foreground statistics without the ignore label (nnunet_ext.planning.fingerprint:
    # nnU-Net counts ignore voxels as foreground); the planner below reuses the corrected fingerprint
    cmd = [
        _exe("nnUNetv2_extract_fingerprint"),
        "-d",
        str(dataset_id),
        "-np",
        n_proc,
        "--verify_dataset_integrity",
    ]
    _run(cmd, env, log, lock)
    from nnunet_ext.planning.fingerprint import exclude_ignore_from_fingerprint

    exclude_ignore_from_fingerprint(dataset_id, opts.num_processes, extract=False, log=log)
    cmd = [_exe("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", cfg, "-np", n_proc]
    if opts.planner:
        cmd += ["-pl", opts.planner]
    _run(cmd, env, log, lock)
    if tiny:
        from nnunet_ext.planning.plans import load_plans, locate_plans, save_plans, tiny_configuration

        plans_file = locate_plans(str(dataset_id), opts.plans)
        plans = load_plans(plans_file)
        if "3d_tiny" not in plans["configurations"]:
            tiny_configuration(plans)
            save_plans(plans_file, plans)
            log(f"added the 3d_tiny configuration to {plans_file}")
    if opts.plans_preset:
        from nnunet_ext.planning.plans import apply_preset, load_plans, locate_plans, save_plans

        plans_file = locate_plans(str(dataset_id), opts.plans)
        plans = load_plans(plans_file)
        report = apply_preset(plans, opts.plans_preset, force=True)  # plans this run just wrote
        if opts.configuration in report.needs_preprocessing:
            raise UserError(
                f"the plans preset {opts.plans_preset!r} gives {opts.configuration} preprocessed data of its own, "
                f"which the recipe does not make; pick a preset whose configurations reuse {cfg}'s data."
            )
        save_plans(plans_file, plans)
        log(f"applied the plans preset {opts.plans_preset} to {plans_file}: {'; '.join(report.lines)}")


def _train(step: dict, opts: RecipeOptions, device: str, resume: bool, log, lock=None) -> None:
    from nnunet_ext.core.nnunet_commands import ext_trainer_env

    cmd = [_exe("nnUNetv2_train"), str(step["dataset"]), opts.configuration, str(step["fold"])]
    cmd += ["-tr", step["trainer"], "-p", opts.plans, "-device", device]
    if resume:
        cmd.append("--c")
    _run(cmd, ext_trainer_env(), log, lock)


def _qc(dataset: Path, state_file: Path, opts: RecipeOptions, log) -> None:
    if opts.qc_cases <= 0:
        return
    from nnunet_ext.labelprop.qc import qc_dataset

    out = state_file.parent / f"{state_file.stem}_qc" / dataset.name
    qc_dataset(dataset, out, max_cases=opts.qc_cases, progress=False)
    log(f"quality-check figures: {out}")


def _check_preset(opts: RecipeOptions) -> None:
    """Refuse, before any step, a preset that does not exist or does not make the configuration to train."""
    if opts.plans_preset is None:
        return
    from nnunet_ext.planning.plans import list_presets

    presets = list_presets()
    if opts.plans_preset not in presets:
        raise UserError(
            f"unknown plans preset {opts.plans_preset!r}; available: {', '.join(presets)} "
            "(`nnunet-ext plans presets`)."
        )
    steps = [s for s in presets[opts.plans_preset].get("steps", []) if s.get("op") in ("add", "tiny")]
    made = {
        s.get("name")
        or (f"{s.get('from', '3d_fullres')}_tiny" if not s.get("from", "3d_").startswith("3d") else "3d_tiny")
        for s in steps
    }
    if opts.configuration not in made | {"2d", "3d_fullres", "3d_lowres"}:
        raise UserError(
            f"-c {opts.configuration}: the plans preset {opts.plans_preset!r} adds "
            f"{', '.join(sorted(made)) or 'no configuration'}; train one of those (-c), or pick another preset."
        )


def run_recipe(
    opts: RecipeOptions,
    state_file: str | os.PathLike | None = None,
    force: bool = False,
    restart: bool = False,
    log=None,
) -> dict:
    """Run (or resume) the recipe; returns the state dict (options, finished steps with their durations)."""
    from nnunet_ext.labelprop import propagate as lp

    log = log or (lambda msg: print(f"[labelprop run] {msg}", flush=True))
    if int(opts.rounds) < 1:
        raise UserError(f"--rounds must be at least 1, got {opts.rounds}.")
    if not opts.folds:
        raise UserError("--folds needs at least one fold.")
    lp.parse_axis(opts.axis)
    _check_preset(opts)
    method = opts.method = opts.method or lp.DEFAULT_METHOD  # recorded resolved: a resumed run keeps it
    from nnunet_ext.core.inference import torch_device

    device = str(
        torch_device(opts.device)
    )  # auto: recorded resolved (cuda or cpu); a missing device is refused
    source = lp._resolve_raw(opts.source)
    opts.source = source.name if source.parent == _raw_root_or_none() else str(source)
    from nnunet_ext.core.nnunet_commands import find_trainer

    for trainer in {opts.trainer_a, opts.trainer_b}:
        cls = find_trainer(trainer)
        n_folds = getattr(cls, "num_folds", 5)
        from nnunet_ext.core.splits import check_fold

        for f in opts.folds:
            check_fold(f, n_folds, trainer)
    state_file = Path(state_file) if state_file else default_state_file(opts.out_id)
    state = _State(state_file, opts, restart)
    from nnunet_ext.core.nnunet_commands import RunLock

    lock = RunLock(state_file.with_suffix(".lock"), f"the labelprop run of {state_file}")
    lock.check()  # a previous run (or a training it started) still alive: refuse before writing anything
    if restart:
        log(f"starting over: {state_file}")
    steps = recipe_steps(opts)
    # fresh datasets: refuse existing ids up front (before hours of work), unless --force
    for step in steps:
        if step["kind"] in ("interpolate", "pseudo") and not state.started(step["key"]) and not force:
            existing = _dataset_folder(step["dataset"])
            if existing is not None:
                raise UserError(
                    f"a dataset with id {step['dataset']} already exists ({existing}); this run would write "
                    f"Dataset{step['dataset']:03d} (ids {opts.out_id}..{opts.out_id + opts.rounds}). Pass --force "
                    f"to replace it or choose another --out-id."
                )
    log(f"state file: {state_file} ({len(state.data['done'])}/{len(steps)} steps done)")
    with lock:
        _run_steps(steps, state, state_file, source, method, device, opts, force, lock, log)
    final = _model_dir(opts.out_id + opts.rounds, opts.trainer_b, opts)
    log(f"finished. Final model: {final}")
    log(
        f"predict: nnUNetv2_predict -i IMAGES -o OUT -d {opts.out_id + opts.rounds} -c {opts.configuration} "
        f"-tr {opts.trainer_b} -p {opts.plans} -f {' '.join(opts.folds)}"
    )
    return state.data


def _run_steps(steps, state, state_file, source, method, device, opts, force, lock, log) -> None:
    from nnunet_ext.labelprop import propagate as lp

    for i, step in enumerate(steps, 1):
        key = step["key"]
        if state.done(key):
            log(f"({i}/{len(steps)}) {key}: done, skipped")
            continue
        was_started = state.started(key)
        log(f"({i}/{len(steps)}) {key}{' (resuming)' if was_started else ''}")
        state.start(key)
        t0 = time.time()
        kind = step["kind"]
        if kind == "interpolate":
            path = lp.interpolate_dataset(
                source,
                step["dataset"],
                method,
                name=opts.name and f"{opts.name}Interp",
                axis=opts.axis,
                annotated_slices=opts.annotated_slices,
                outside=opts.outside,
                force=force or was_started,
            )
            log(f"wrote {path}")
            _qc(path, state_file, opts, log)
        elif kind == "preprocess":
            _preprocess(step["dataset"], opts, log, step.get("plans_from"), lock)
        elif kind == "train":
            model = _model_dir(step["dataset"], step["trainer"], opts) / f"fold_{step['fold']}"
            if was_started and (model / "checkpoint_final.pth").is_file():
                log(f"{model} already holds checkpoint_final.pth: training finished before the interruption")
            else:
                resume = was_started and any(
                    (model / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_best.pth")
                )
                _train(step, opts, device, resume, log, lock)
        elif kind == "pseudo":
            model = _model_dir(step["model_dataset"], step["model_trainer"], opts)
            path = lp.pseudo_label_dataset(
                source,
                model,
                step["dataset"],
                folds=list(opts.folds),
                name=opts.name and f"{opts.name}Round{step['dataset'] - opts.out_id}",
                axis=opts.axis,
                annotated_slices=opts.annotated_slices,
                device=device,
                tta=opts.tta,
                force=force or was_started,
            )
            log(f"wrote {path}")
            _qc(path, state_file, opts, log)
        state.finish(key, time.time() - t0)


def _raw_root_or_none() -> Path | None:
    value = os.environ.get("nnUNet_raw")
    return Path(value) if value else None


def _cmd_run(args) -> int:
    opts = RecipeOptions(
        source=args.source,
        out_id=args.out_id,
        rounds=args.rounds,
        method=args.method,
        outside=args.outside,
        axis=args.axis,
        annotated_slices=str(Path(args.annotated_slices).resolve()) if args.annotated_slices else None,
        configuration=args.configuration,
        plans=args.plans,
        planner=args.planner,
        trainer_a=args.trainer_a,
        trainer_b=args.trainer_b,
        folds=tuple(str(f) for f in args.folds),
        device=args.device,
        num_processes=args.num_processes,
        tta=not args.disable_tta,
        qc_cases=args.qc_cases,
        name=args.name,
        plans_preset=args.plans_preset,
    )
    run_recipe(opts, args.state, force=args.force, restart=args.restart)
    return 0


def add_run_parser(sub) -> None:
    from nnunet_ext.labelprop.propagate import DEFAULT_METHOD, METHODS, OUTSIDE_CHOICES

    p = sub.add_parser(
        "run",
        help="the whole recipe: interpolate -> train A -> pseudo-label -> train B (resumable)",
        description="Interpolate the sparse annotations, train model A (short schedule, 4 folds), pseudo-label "
        "the training scans with its fold ensemble, train model B (long schedule) on them; optionally more "
        "rounds. Uses nnUNetv2_plan_and_preprocess / nnUNetv2_train underneath. Rerun the same command to "
        "resume after an interruption.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="sparse raw dataset: id, name under nnUNet_raw, or folder"
    )
    p.add_argument("--out-id", type=int, required=True, help="first new dataset id (uses ids N .. N+rounds)")
    p.add_argument("--name", default=None, help="name stem of the new datasets (default: from the source)")
    p.add_argument("--rounds", type=int, default=1, help="pseudo-label rounds (default 1, the COSMOS recipe)")
    p.add_argument(
        "--method", choices=METHODS, default=None, help=f"interpolation (default {DEFAULT_METHOD})"
    )
    p.add_argument("--outside", choices=OUTSIDE_CHOICES, default="ignore", help="outside the annotated range")
    p.add_argument("--axis", default=None, help="slice axis z|y|x (default: detect)")
    p.add_argument("--annotated-slices", default=None, metavar="JSON", help="JSON {case: [slice indices]}")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="3d_fullres (default), 3d_tiny, ...")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument(
        "--plans-preset",
        default=None,
        metavar="PRESET",
        help="apply this plans preset (`nnunet-ext plans presets`) after planning, e.g. converge with "
        "-c 3d_converge; later rounds reuse the same plans",
    )
    p.add_argument(
        "-pl", "--planner", default=None, help="experiment planner for nnUNetv2_plan_and_preprocess"
    )
    p.add_argument(
        "--trainer-a", default="nnUNetTrainerLabelPropA", help="model A (default 100 epochs, 4 folds)"
    )
    p.add_argument(
        "--trainer-b", default="nnUNetTrainerLabelPropB", help="model B (default 500 epochs, 4 folds)"
    )
    p.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2", "3"], help="folds (default 0 1 2 3)")
    p.add_argument(
        "-device", "--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="default auto"
    )
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    p.add_argument(
        "--disable_tta", "--disable-tta", action="store_true", help="no mirroring when pseudo-labelling"
    )
    p.add_argument(
        "--qc-cases", type=int, default=3, help="QC figures per written dataset (default 3, 0: none)"
    )
    p.add_argument(
        "--state", default=None, help="state file (default $nnUNet_results/labelprop_runs/run_N.json)"
    )
    p.add_argument("--force", action="store_true", help="replace existing datasets with the run's ids")
    p.add_argument("--restart", action="store_true", help="discard the state file and start over")
    p.set_defaults(func=_cmd_run)
