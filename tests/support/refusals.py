"""Test helpers (moved from tests/challenges/test_bad_input_challenges.py): run_refused, tree, truncate."""

from __future__ import annotations

import hashlib
from pathlib import Path

from nnunet_ext.cli import main


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def truncate(path: Path, fraction: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def run_refused(argv, capsys, root: Path, message: str) -> None:
    before = tree(root)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err
    assert tree(root) == before
