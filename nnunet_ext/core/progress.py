"""The one progress bar of our commands: tqdm over cases, on stderr (stdout stays for results), off on request."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(items: Iterable, desc: str, enabled: bool = True, total: int | None = None) -> Iterable:
    """``items`` with a tqdm bar counting cases on stderr when ``enabled``; else ``items`` unchanged."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="case", file=sys.stderr)
