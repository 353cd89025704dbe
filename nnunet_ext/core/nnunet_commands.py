"""Finding trainers the way nnU-Net does, and the environment our subprocesses run nnU-Net in."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nnunet_ext import trainer_dir
from nnunet_ext.core.errors import UserError

_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def device_arg(value: str) -> str:
    """argparse type of every ``--device``: auto, cpu, cuda, cuda:N or mps (checked without importing torch)."""
    device = value.strip().lower()
    if not _DEVICE.fullmatch(device):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return device


def fold_arg(value: str) -> str:
    """argparse type of ``-f`` (folds): a whole number >= 0 or ``all``, as nnUNetv2_predict takes them."""
    fold = value.strip()
    if fold != "all" and not fold.isdigit():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a fold; folds are whole numbers or 'all' (e.g. -f 0 1)"
        )
    return fold


def count_arg(minimum: int):
    """argparse type: a whole number >= ``minimum`` (counts of steps, cases, processes)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def ext_trainer_env(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: os.environ) whose nnUNet_extTrainer includes our trainer folder."""
    env = dict(os.environ if env is None else env)
    parts = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    if trainer_dir() not in parts:
        parts.insert(0, trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(parts)
    return env


def find_trainer(name: str) -> type:
    """The trainer class ``name``, looked up by name as nnU-Net does (the library never imports
    ``nnunet_ext.trainers`` itself): ours through the folder of ``nnunet-ext trainer-dir`` with nnU-Net's own
    search, so the class object is the one ``nnUNetv2_train -tr NAME`` uses; else nnU-Net's or one in
    ``nnUNet_extTrainer``."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_ext import trainer_dir

    folder = trainer_dir()
    with contextlib.redirect_stdout(io.StringIO()):
        found = recursive_find_python_class(
            folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True
        )
    if found is not None:
        return found
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError) as e:
        from nnunet_ext.core.schedules import SCHEDULES

        ours = sorted(
            f.stem for f in (Path(__file__).resolve().parent.parent / "trainers").glob("nnUNetTrainer*.py")
        )
        suffixes = ", ".join(f"_{s}" for s in SCHEDULES)
        raise UserError(
            f"trainer {name!r} not found: not one of nnunet_ext's ({', '.join(ours)}, each also with the "
            f"schedule suffixes {suffixes}), not in nnU-Net, not in nnUNet_extTrainer. Check the "
            f"spelling. ({str(e).splitlines()[0][:200]})"
        ) from e


def nnunet_command(name: str) -> str:
    """Path of a console script (e.g. ``nnUNetv2_train``) of this Python environment, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise UserError(
            f"{name} not found: is nnunetv2 installed in this environment? (pip install nnunetv2)"
        )
    return found


def train_command(dataset, configuration: str, fold, trainer: str, device: str, *extra: str) -> list[str]:
    """The stock ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -device DEVICE [extra]`` command."""
    return [
        nnunet_command("nnUNetv2_train"),
        str(dataset),
        configuration,
        str(fold),
        "-tr",
        trainer,
        "-device",
        device,
        *extra,
    ]


def predict_command(
    images: Path, out: Path, dataset, configuration: str, fold, trainer: str, device: str, *extra: str
) -> list[str]:
    """The stock ``nnUNetv2_predict`` of one fold's model on a folder of images, one worker per stage
    (``-npp 1 -nps 1``: what small CPU machines and CI runners can afford)."""
    return [
        nnunet_command("nnUNetv2_predict"),
        "-i",
        str(images),
        "-o",
        str(out),
        "-d",
        str(dataset),
        "-c",
        configuration,
        "-f",
        str(fold),
        "-tr",
        trainer,
        "-device",
        device,
        "-npp",
        "1",
        "-nps",
        "1",
        *extra,
    ]


# ----------------------------------------------------------------------------- child processes and run locks
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _default_signals() -> None:  # runs in the child between fork and exec
    for s in _FORWARDED:
        signal.signal(s, signal.SIG_DFL)


@contextlib.contextmanager
def child_process(cmd: list[str], env: dict, lock: RunLock | None = None, **popen):
    """Run ``cmd`` in its own process group and yield the ``Popen``; on leaving, wait for it.

    While it runs, SIGINT / SIGTERM / SIGHUP sent to us are forwarded to the child's whole group (nnU-Net's
    data-loader workers too) and we wait for it to end before stopping ourselves (KeyboardInterrupt for SIGINT,
    exit 128 + signal otherwise): killing a command never leaves its training running. ``lock`` records the
    child's pid while it runs (see :class:`RunLock`)."""
    # the child reacts to the signals we forward even where we were started with SIGINT ignored (a background
    # job of a non-interactive shell): it gets the default dispositions back
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_default_signals, **popen)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in _FORWARDED} if main_thread else {}
    try:
        if lock is not None:
            lock.hold(proc.pid)
        try:
            yield proc
        finally:
            proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if lock is not None:
            lock.hold(None)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + received[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped) is not running anything
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class RunLock:
    """A lock file beside a resumable run's state: which process runs it and which child it is waiting for.

    :meth:`acquire` refuses while a previous run of the same state is alive (its command, or a training it
    started and that outlived it), so a resumed run never starts a second training into the same folder.
    A lock whose processes are all gone is stale and taken over."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def check(self) -> None:
        """Refuse (:class:`UserError`) while the run recorded in the lock file, or its child, is alive."""
        held = self._read()
        for key, role in (("child", "its child process"), ("pid", "its command")):
            pid = held.get(key)
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise UserError(
                    f"{self.what} is still running ({role}, pid {pid}, recorded in {self.path}); wait for it to "
                    f"finish or stop it (kill -TERM -{held.get('child') or pid}), then rerun this command."
                )

    def acquire(self) -> RunLock:
        self.check()
        self.hold(None)
        return self

    def hold(self, child: int | None) -> None:
        from nnunet_ext.core.io import atomic_write_json

        atomic_write_json(self.path, {"pid": os.getpid(), "child": child})

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_logged(
    cmd: list[str], env: dict, log: Path, quiet: bool = False, lock: RunLock | None = None
) -> float:
    """Run a stock nnU-Net command, streaming its output (and appending it to ``log``); return seconds."""
    print(f"$ {' '.join([Path(cmd[0]).name, *cmd[1:]])}", flush=True)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n")
        # unbuffered: nnU-Net's progress lines arrive as they are printed, not in blocks
        with child_process(
            cmd,
            {**env, "PYTHONUNBUFFERED": "1"},
            lock,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        ) as proc:
            for line in proc.stdout:
                logf.write(line)
                if not quiet and line.strip():
                    print(f"    {line.rstrip()}", flush=True)
        code = proc.returncode
    if code != 0:
        raise UserError(f"`{Path(cmd[0]).name}` failed with exit code {code}; see the log {log}")
    return time.perf_counter() - start


def preprocess_with_plans_of(
    source_id: int,
    target_id: int,
    env: dict,
    run,
    plans: str = "nnUNetPlans",
    configuration: str = "3d_fullres",
    num_processes: int = 1,
    fix: str = "",
) -> None:
    """Preprocess dataset ``target_id`` with dataset ``source_id``'s plans unchanged, so that models trained on
    either build the same network (patch size, spacing, normalisation): ``nnUNetv2_extract_fingerprint``,
    ``nnUNetv2_move_plans_between_datasets``, then ``nnUNetv2_preprocess``. ``run(cmd)`` runs one command (the
    caller's logging and error handling); ``env`` names nnU-Net's folders; ``fix`` completes the error for an
    unreadable dataset.json."""
    from nnunet_ext.core.datasets import existing_datasets_with_id
    from nnunet_ext.core.io import atomic_write_json, read_json

    n_proc = str(num_processes)
    run([nnunet_command("nnUNetv2_extract_fingerprint"), "-d", str(target_id), "-np", n_proc])
    cmd = [nnunet_command("nnUNetv2_move_plans_between_datasets"), "-s", str(source_id), "-t", str(target_id)]
    run([*cmd, "-sp", plans, "-tp", plans])
    # nnUNetv2_preprocess reads <preprocessed>/<dataset>/dataset.json, which only the planner copies there
    found = existing_datasets_with_id(Path(env["nnUNet_raw"]), target_id)
    if not found:
        raise UserError(
            f"no Dataset{target_id:03d}_* in nnUNet_raw={env['nnUNet_raw']}; write the dataset first."
        )
    raw = found[0]
    dataset_json = read_json(raw / "dataset.json", "the dataset.json", fix)
    atomic_write_json(Path(env["nnUNet_preprocessed"]) / raw.name / "dataset.json", dataset_json)
    cmd = [nnunet_command("nnUNetv2_preprocess"), "-d", str(target_id), "-plans_name", plans]
    run([*cmd, "-c", configuration, "-np", n_proc])
