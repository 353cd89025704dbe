"""Every parity fixture names the public repository and the 40-hex commit its numbers came from (issue 15)."""

from __future__ import annotations

import json
import re

import pytest
from support.paths import DATA

PARITY = DATA / "parity"
COMMIT = re.compile(r"[0-9a-f]{40}")


def _sources(node):
    """Every dict with a 'repository' key, however deep (MOTS names DoDNet, MedPy and scikit-image)."""
    if isinstance(node, dict):
        if "repository" in node:
            yield node
        for value in node.values():
            yield from _sources(value)


@pytest.mark.parametrize("path", sorted(PARITY.glob("*.json")), ids=lambda p: p.name)
def test_fixture_names_repository_and_commit(path):
    fixture = json.loads(path.read_text(encoding="utf-8"))
    sources = list(_sources(fixture["source"]))
    assert sources, f"{path.name}: no source repository"
    for source in sources:
        assert "/" in source["repository"], source
        assert COMMIT.fullmatch(source.get("commit", "")), (
            f"{path.name}: {source['repository']} has no commit"
        )


def test_every_challenge_with_official_code_has_a_fixture():
    names = {p.stem for p in PARITY.glob("*.json")}
    assert {"kipa22_official", "kits21_official", "mots_dodnet_official"} <= names
    assert {"surface_distance_official", "medpy_official"} <= names  # AMOS22 NSD / MedPy distances
