"""Finding trainers the way nnU-Net does, and the environment our subprocesses run nnU-Net in."""

from __future__ import annotations

import contextlib
import io
import os

from nnunet_ext import trainer_dir
from nnunet_ext.errors import UserError


def ext_trainer_env(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: os.environ) whose nnUNet_extTrainer includes our trainer folder."""
    env = dict(os.environ if env is None else env)
    parts = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    if trainer_dir() not in parts:
        parts.insert(0, trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(parts)
    return env


def find_trainer(name: str) -> type:
    """The trainer class ``name``: ours (nnunet_ext.trainers), nnU-Net's, or one in nnUNet_extTrainer."""
    import nnunet_ext.trainers as ours

    if name in ours.__all__:
        return getattr(ours, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError) as e:
        raise UserError(
            f"trainer {name!r} not found: not one of nnunet_ext's ({', '.join(ours.__all__)}), not in nnU-Net, "
            f"not in nnUNet_extTrainer. Check the spelling. ({str(e).splitlines()[0][:200]})"
        ) from e
