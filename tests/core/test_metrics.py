"""Metrics on hand-made volumes with known answers."""

import math

import numpy as np

from nnunet_ext.core.metrics import dice, hd95, per_structure


def cube(shape, lo, hi):
    a = np.zeros(shape, bool)
    a[tuple(slice(start, stop) for start, stop in zip(lo, hi))] = True
    return a


def test_dice_known_values():
    a = cube((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = cube((10, 10, 10), (0, 0, 2), (4, 4, 6))  # 64 voxels, overlap 32
    assert dice(a, a) == 1.0
    assert dice(a, b) == 0.5
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    assert dice(a, np.zeros_like(a)) == 0.0


def test_hd95_respects_spacing_and_empty_conventions():
    a = cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    shifted_x = cube((20, 20, 20), (5, 5, 7), (10, 10, 12))  # 2 voxels along the last axis
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert math.isclose(hd95(a, shifted_x, (1.0, 1.0, 1.0)), 2.0)
    assert math.isclose(hd95(a, shifted_x, (1.0, 1.0, 0.5)), 1.0)  # spacing of the shifted axis
    shifted_z = cube((20, 20, 20), (7, 5, 5), (12, 10, 10))
    assert math.isclose(hd95(a, shifted_z, (2.5, 1.0, 1.0)), 5.0)
    empty = np.zeros_like(a)
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert hd95(a, empty, (1, 1, 1)) == math.inf


def test_per_structure():
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[:4] = 1
    gt[4:] = 2
    r = per_structure(gt, gt, {"a": 1, "b": 2}, (1, 1, 1))
    assert r == {"a": {"Dice": 1.0, "HD95": 0.0}, "b": {"Dice": 1.0, "HD95": 0.0}}
