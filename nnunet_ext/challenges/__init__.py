"""Challenge definitions: layout, labels, converter, metric conventions and submission format of KiPA22,
AMOS22 (tasks 1 and 2), KiTS21, COSMOS22 and the seven MOTS sources (+ the merged MOTS dataset).

``CHALLENGES`` maps the name used on the command line (``nnunet-ext convert NAME``, ``evaluate --challenge
NAME``, ``submit NAME``) to its :class:`~nnunet_ext.challenges.base.Challenge`; :func:`get_challenge` looks one
up with an error that lists the valid names. See docs/challenges/README.md.
"""

from __future__ import annotations

from nnunet_ext.challenges.amos22 import AMOS22, AMOS22MRI, AMOS22Task2
from nnunet_ext.challenges.base import Challenge, EvalClass, MetricRules, convert
from nnunet_ext.challenges.cosmos22 import COSMOS22
from nnunet_ext.challenges.kipa22 import KiPA22
from nnunet_ext.challenges.kits21 import KiTS21
from nnunet_ext.challenges.mots import MOTS, MOTS_SOURCES
from nnunet_ext.core.errors import UserError

__all__ = ["CHALLENGES", "Challenge", "EvalClass", "MetricRules", "convert", "get_challenge"]

CHALLENGES: dict[str, Challenge] = {
    c.name: c
    for c in (
        KiPA22(),
        AMOS22(),
        AMOS22Task2(),
        AMOS22MRI(),
        KiTS21(),
        COSMOS22(),
        MOTS(),
        *MOTS_SOURCES.values(),
    )
}


def get_challenge(name: str) -> Challenge:
    key = str(name).strip().lower()
    if key not in CHALLENGES:
        raise UserError(f"unknown challenge {name!r}; choose one of: {', '.join(CHALLENGES)}.")
    return CHALLENGES[key]
