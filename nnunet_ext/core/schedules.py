"""Training schedules: short trainer variants (like nnU-Net's ``nnUNetTrainer_5epochs``) and the learning-rate
schedule of our trainers that do not use nnU-Net's.

Short variants:

nnU-Net picks a schedule by trainer name, so every trainer we ship also exists as

* ``<Trainer>_smoke``: a handful of iterations; proves the whole pipeline runs (tests, CI, new installs);
* ``<Trainer>_demo``: a few minutes on 2 CPU cores with a tiny configuration (``nnunet-ext demo``);
* ``<Trainer>_converge``: trained to the plateau on the convergence phantoms (``benchmarks/converge.py``).

The variants only change ``num_epochs`` / ``num_iterations_per_epoch`` / ``num_val_iterations_per_epoch``
and ``save_every`` (the end of a short schedule; every 10 epochs of ``converge``); everything else (network,
loss, checkpoint format) is the base trainer's. The values are class attributes, so every DDP rank sees the same
schedule.

One more thing for ``converge`` only: on the CPU it keeps the torch thread count that OMP_NUM_THREADS asks for.
``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(multiprocessing.cpu_count())`` before it builds the
trainer, so two CPU trainings side by side on a 2-core machine run four compute threads on two cores, and each
step took ~5x as long as with one thread each (2026-12-03: 147 s instead of 27 s per 60-step epoch of 3d_tiny;
py-spy showed both threads of each process busy). The convergence benchmarks run two trainings at once, some of
them started by our own commands (``nnunet-ext labelprop run``), so the hold lives in the schedule. Without
OMP_NUM_THREADS, or on a GPU, nothing changes.
"""

from __future__ import annotations

import os

import torch
from torch.optim.lr_scheduler import _LRScheduler

SCHEDULES: dict[str, dict[str, int]] = {
    "smoke": {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1},
    "demo": {"num_epochs": 30, "num_iterations_per_epoch": 30, "num_val_iterations_per_epoch": 4},
    # the convergence benchmarks (issue 20, benchmarks/converge.py): on `phantoms --profile converge` with the
    # plans preset `converge`, plain nnUNetTrainer finds its last structure anywhere from ~1000 to 2000+
    # iterations (the run's own randomness; at 60 epochs some runs never did), so 100 epochs leave a slow
    # starter room to converge
    "converge": {
        "num_epochs": 100,
        "num_iterations_per_epoch": 50,
        "num_val_iterations_per_epoch": 10,
        "save_every": 10,
    },
}
HOLD_THREADS = {"converge"}  # schedules that keep OMP_NUM_THREADS torch threads on the CPU (see above)


def hold_cpu_threads(device: torch.device) -> None:
    """On the CPU, set torch's thread count to OMP_NUM_THREADS when that is set (nnUNetv2_train has just set it
    to every core)."""
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if torch.device(device).type == "cpu" and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def schedule_variant(base: type, schedule: str, module: str) -> type:
    """Return ``<base>_<schedule>``, a subclass of ``base`` that trains on the named short schedule."""
    settings = SCHEDULES[schedule]

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for attribute, value in settings.items():
            setattr(self, attribute, value)
        # short schedules: one checkpoint at the end; long ones say how often (resumable with --c)
        self.save_every = settings.get("save_every", max(1, settings["num_epochs"]))
        if schedule in HOLD_THREADS:
            hold_cpu_threads(self.device)

    name = f"{base.__name__}_{schedule}"
    description = ", ".join(f"{k}={v}" for k, v in settings.items())
    if schedule in HOLD_THREADS:
        description += "; on the CPU, OMP_NUM_THREADS torch threads"
    return type(
        name,
        (base,),
        {
            "__init__": __init__,
            "__module__": module,
            "__qualname__": name,
            "__doc__": f"{base.__name__} on the '{schedule}' schedule ({description}).",
        },
    )


def add_schedule_variants(namespace: dict, bases: list[type], module: str) -> list[str]:
    """Create every schedule variant of ``bases`` in ``namespace``; return the names created."""
    names = []
    for base in bases:
        for schedule in SCHEDULES:
            variant = schedule_variant(base, schedule, module)
            namespace[variant.__name__] = variant
            names.append(variant.__name__)
    return names


class PolyLRScheduler(_LRScheduler):
    """nnU-Net's poly decay per parameter group, with an optional linear warm-up.

    Each group's learning rate is its own initial lr (``group["initial_lr"]``, the lr the optimizer was built
    with) times ``(step + 1) / warmup_steps`` during warm-up, then ``(1 - (step - warmup) / (max_steps -
    warmup)) ** exponent``. With one group and no warm-up this is exactly nnU-Net's ``PolyLRScheduler``, which
    sets ONE lr on every group and so cannot keep e.g. LoRA adapters and a new head at different rates.
    ``step(current_step)`` like nnU-Net's (the trainer passes the epoch).
    """

    def __init__(self, optimizer, max_steps: int, warmup_steps: int = 0, exponent: float = 0.9):
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)  # stores group["initial_lr"] = group["lr"], then step()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        return max(0.0, 1 - (step - self.warmup_steps) / span) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        f = self.factor(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
