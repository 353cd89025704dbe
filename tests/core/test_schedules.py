"""nnunet_ext.core.schedules: the short schedule variants of a trainer."""

from __future__ import annotations

import pytest
import torch

from nnunet_ext.core.schedules import SCHEDULES, schedule_variant


class _Base:
    """What a trainer looks like to a schedule variant; built after nnUNetv2_train -device cpu asked torch for
    every core (here: 3 threads)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):  # noqa: B008
        self.device = device
        self.num_epochs = 1000


@pytest.fixture
def threads(torch_threads):
    torch_threads(3)  # what nnUNetv2_train -device cpu asked for


@pytest.mark.parametrize(
    ("schedule", "omp", "device", "expected"),
    [
        ("converge", "1", "cpu", 1),  # two benchmark trainings share a 2-core machine
        ("converge", None, "cpu", 3),  # no OMP_NUM_THREADS: nnU-Net's choice stays
        ("converge", "", "cpu", 3),
        ("converge", "1", "meta", 3),  # not the CPU: nothing to hold
        ("smoke", "1", "cpu", 3),  # only the converge schedule holds threads
        ("demo", "1", "cpu", 3),
    ],
)
def test_converge_schedule_keeps_omp_num_threads_on_the_cpu(
    threads, monkeypatch, schedule, omp, device, expected
):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    trainer = schedule_variant(_Base, schedule, __name__)({}, "3d_tiny", 0, {}, torch.device(device))
    assert torch.get_num_threads() == expected
    assert trainer.num_epochs == SCHEDULES[schedule]["num_epochs"]


def test_variant_names_and_documents_its_schedule():
    variant = schedule_variant(_Base, "converge", __name__)
    assert variant.__name__ == "_Base_converge" and issubclass(variant, _Base)
    assert "num_epochs=100" in variant.__doc__ and "OMP_NUM_THREADS" in variant.__doc__
    assert "OMP_NUM_THREADS" not in schedule_variant(_Base, "smoke", __name__).__doc__
