"""Test helpers (moved from tests/challenges/test_parity_mots.py): build_pp_case, paint, pp_cases."""

from __future__ import annotations

import numpy as np

from nnunet_ext.challenges.mots import DODNET_SPACING


def paint(shape, spacing, objects) -> np.ndarray:
    """A uint8 label map (z, y, x): each (kind, centre mm, size mm, value) painted in order; a sphere's size is
    its radius, a box's its half extents (z, y, x). Voxel i lies at i * spacing mm."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for kind, centre, size, value in objects:
        d = [g - c for g, c in zip(grids, centre)]
        if kind == "sphere":
            mask = d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= size**2
        else:
            mask = (np.abs(d[0]) <= size[0]) & (np.abs(d[1]) <= size[1]) & (np.abs(d[2]) <= size[2])
        lab[mask] = value
    return lab


def pp_cases() -> dict:
    box = "box"
    return {
        "liver": (
            "liver",
            (20, 40, 40),
            [
                (box, (15.0, 16.0, 16.0), (7.0, 8.0, 8.0), 1),  # the liver
                (box, (15.0, 16.0, 29.6), (3.0, 2.0, 2.0), 1),  # a second, smaller liver piece -> background
                (box, (15.0, 16.0, 14.0), (3.0, 3.0, 3.0), 2),  # a large tumour
                (box, (12.0, 12.0, 20.0), (1.5, 1.2, 1.2), 2),  # <= 50 voxels: removed (-> liver)
                (box, (15.0, 16.0, 29.6), (1.5, 1.2, 1.2), 2),  # tumour in the removed piece
            ],
        ),
        "liver_single_small_tumour": (
            "liver",
            (20, 40, 40),
            [(box, (15.0, 16.0, 16.0), (7.0, 8.0, 8.0), 1), (box, (12.0, 12.0, 20.0), (1.5, 1.2, 1.2), 2)],
        ),
        "kidney": (
            "kidney",
            (20, 40, 40),
            [
                (box, (15.0, 16.0, 8.0), (6.0, 5.0, 4.0), 1),
                (box, (15.0, 16.0, 24.0), (6.0, 5.0, 4.0), 1),
                (box, (6.0, 28.0, 16.0), (1.5, 1.6, 1.6), 1),  # third piece -> background
                (box, (15.0, 16.0, 24.0), (2.0, 2.0, 2.0), 2),  # largest tumour
                (box, (15.0, 16.0, 8.0), (1.5, 1.6, 1.6), 2),  # smaller tumour -> kidney
            ],
        ),
        "hepaticvessel": (
            "hepaticvessel",
            (20, 40, 40),
            [
                (box, (15.0, 16.0, 16.0), (10.0, 1.2, 1.2), 1),
                (box, (6.0, 30.0, 6.0), (1.0, 0.8, 0.8), 1),  # vessel pieces are not post-processed
                (box, (15.0, 10.0, 16.0), (3.0, 2.0, 2.0), 2),
                (box, (15.0, 24.0, 24.0), (1.5, 1.2, 1.2), 2),  # <= 50 voxels -> background
            ],
        ),
        "pancreas": (
            "pancreas",
            (20, 40, 40),
            [(box, (15.0, 16.0, 16.0), (6.0, 6.0, 6.0), 1), (box, (15.0, 16.0, 16.0), (1.5, 1.6, 1.6), 2)],
        ),
        "colon": (
            "colon",
            (20, 40, 40),
            [(box, (15.0, 16.0, 12.0), (3.0, 3.0, 3.0), 1), (box, (15.0, 16.0, 24.0), (3.0, 2.4, 2.4), 1)],
        ),
        "lung": (
            "lung",
            (20, 40, 40),
            [(box, (15.0, 16.0, 12.0), (1.5, 1.6, 1.6), 1), (box, (15.0, 16.0, 24.0), (3.0, 2.4, 2.4), 1)],
        ),
        "spleen_edge_contact": (
            "spleen",
            (20, 40, 40),
            [
                (box, (15.0, 16.0, 16.0), (4.5, 4.0, 4.0), 1),
                # touches the spleen along an edge only: a separate 6-connected component -> removed
                (box, (15.0, 22.4, 22.4), (4.5, 2.0, 2.0), 1),
            ],
        ),
    }


def build_pp_case(name: str):
    task, shape, objects = pp_cases()[name]
    return task, paint(shape, DODNET_SPACING, objects)
