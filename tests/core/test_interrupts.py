"""Stopping a command never leaves its nnU-Net child running, and a resumed run refuses to start while a
previous one (or a training it started) is still alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nnunet_ext.cli import main
from nnunet_ext.core.nnunet_commands import RunLock

PARENT = textwrap.dedent(
    """
    import sys
    from nnunet_ext.core.nnunet_commands import RunLock, child_process
    with RunLock(sys.argv[1], "the test run") as lock:
        with child_process([sys.executable, "-c", "import time; time.sleep(120)"], {}, lock):
            pass
    """
)


def wait_for(predicate, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_to_the_command_stops_its_child_and_frees_the_lock(tmp_path, sig, code):
    lock = tmp_path / "run.lock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(lock)], env=env)
    assert wait_for(lambda: lock.is_file() and json.loads(lock.read_text() or "{}").get("child"))
    child = json.loads(lock.read_text())["child"]
    assert alive(child)
    parent.send_signal(sig)
    # an uncaught KeyboardInterrupt ends Python with SIGINT itself: -2
    assert parent.wait(timeout=60) in (code, -int(sig))
    assert wait_for(lambda: not alive(child), 30), "the child outlived its command"
    assert not lock.exists()


def _sparse_sources(tmp_path, monkeypatch, *dataset_ids: int) -> None:
    """nnU-Net's folders under tmp_path and tiny sparse phantoms with these ids."""
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    for i in dataset_ids:
        write_phantom_dataset(
            tmp_path / "raw", i, kind="sparse", num_train=5, num_test=1, shape=(16, 40, 40), every=4
        )


def test_resume_refuses_while_a_previous_training_is_alive(tmp_path, capsys, monkeypatch):
    """A lock naming a live child (a training that outlived a SIGKILLed command) blocks `labelprop run`; nothing
    is written; once the child is gone the stale lock is taken over."""
    _sparse_sources(tmp_path, monkeypatch, 570)
    state = tmp_path / "state.json"
    training = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        state.with_suffix(".lock").write_text(json.dumps({"pid": 999999, "child": training.pid}))
        before = sorted(p.name for p in tmp_path.rglob("*"))
        argv = [
            "labelprop",
            "run",
            "570",
            "--out-id",
            "571",
            "-c",
            "3d_tiny",
            "-f",
            "0",
            "--state",
            str(state),
        ]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"is still running (its child process, pid {training.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no state file, nothing else
    finally:
        training.kill()
        training.wait()
    RunLock(state.with_suffix(".lock"), "x").check()  # stale now: no error


def test_a_refused_run_writes_no_state_file(tmp_path, capsys, monkeypatch):
    _sparse_sources(tmp_path, monkeypatch, 572, 573)
    state = tmp_path / "state.json"
    argv = ["labelprop", "run", "572", "--out-id", "573", "-c", "3d_tiny", "-f", "0", "--state", str(state)]
    assert main(argv) == 1  # Dataset573 exists: refused without --force
    assert "already exists" in capsys.readouterr().err
    assert not state.exists() and not state.with_suffix(".lock").exists()


def test_a_broken_state_file_is_one_line(tmp_path, capsys, monkeypatch):
    """A truncated state file of `labelprop run` (killed while writing with another tool, edited by hand):
    one line naming the file and the fix, nothing written."""
    _sparse_sources(tmp_path, monkeypatch, 574)
    state = tmp_path / "state.json"
    state.write_text('{"options": {"source": "Dataset574')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["labelprop", "run", "574", "--out-id", "575", "-c", "3d_tiny", "-f", "0", "--state", str(state)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert f"the labelprop run's state file {state} is not valid JSON" in err and "pass --restart" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_medseqft_run_refuses_while_another_run_of_its_folder_is_alive(tmp_path, capsys, monkeypatch):
    """Two `medseqft run` into one --output would train into the same model folders: the second is refused
    while the first (recorded in medseqft_run.lock) is alive, and takes a stale lock over."""
    from support.medseqft_env import _medseqft_env

    import nnunet_ext.medseqft.run as medseqft_run

    _medseqft_env(tmp_path, monkeypatch)
    monkeypatch.setattr(medseqft_run, "check_compatible", lambda *a, **k: None)
    ckpt = tmp_path / "m0.pth"
    ckpt.write_bytes(b"x")
    out = tmp_path / "o"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "medseqft_run.lock").write_text(json.dumps({"pid": first.pid, "child": None}))
        argv = ["medseqft", "run", "--pretrained", str(ckpt), "-d", "611", "-c", "3d_fullres", "-o", str(out)]
        assert main([*argv, "--device", "cpu", "--strategies", "sequential"]) == 1
        err = capsys.readouterr().err
        assert f"the medseqft run in {out} is still running (its command, pid {first.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == ["medseqft_run.lock"]  # no state file written
    finally:
        first.kill()
        first.wait()
    RunLock(out / "medseqft_run.lock", "x").check()  # stale now: no error
