"""Synthetic abdomen-like CT phantoms written as nnU-Net v2 raw datasets (see docs/phantoms.md).

Every case is a small 3D volume (z, y, x) with anisotropic spacing: a body (subcutaneous fat, a muscle
wall, visceral fat, a vertebra, bowel loops with gas) in air, and adjacent organs that share boundaries
(liver, two kidneys, spleen: deformed ellipsoids whose overlaps are split by the nearest organ), hypodense
tumours inside liver and kidney, and thin contrast-bright vessels (smooth random curves, radius 1-1.5
voxels in-plane). Intensities are CT-like Hounsfield units with correlated Gaussian noise and a
partial-volume blur; labels stay crisp. Everything is deterministic given the seed.

Variants (``kind``):

* ``full``: fully labelled (background 0, liver 1, kidney 2, spleen 3, tumour 4, vessel 5);
* ``partial``: MOTS-like partially labelled tasks (``liver_*``, ``kidney_*``, ``spleen_*`` cases), each case
  annotating only its task's structures, with the task registry in dataset.json;
* ``sparse``: COSMOS-like, only every k-th axial slice annotated, the rest nnU-Net's ignore label;
* ``multimodal``: two channels (CT and a T2-like MR with different contrasts), fully labelled.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.core.datasets import RawDatasetWriter, check_dataset_id_and_name
from nnunet_ext.core.errors import UserError
from nnunet_ext.core.progress import progress as progress_bar

__all__ = [
    "KINDS",
    "FULL_LABELS",
    "PARTIAL_LABELS",
    "PARTIAL_TASKS",
    "SPARSE_LABELS",
    "IGNORE_LABEL",
    "MIN_SHAPE",
    "PROFILES",
    "PhantomCase",
    "make_case",
    "make_case_parts",
    "make_parcellation",
    "partial_truth",
    "sparse_slices",
    "write_phantom_dataset",
    "default_name",
    "add_parser",
]

KINDS = ("full", "partial", "sparse", "multimodal")
FULL_LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "tumour": 4, "vessel": 5}
PARTIAL_LABELS = {
    "background": 0,
    "liver": 1,
    "liver_tumour": 2,
    "kidney": 3,
    "kidney_tumour": 4,
    "spleen": 5,
}
PARTIAL_TASKS = {
    "liver": {"prefixes": ["liver_"], "labels": ["liver", "liver_tumour"]},
    "kidney": {"prefixes": ["kidney_"], "labels": ["kidney", "kidney_tumour"]},
    "spleen": {"prefixes": ["spleen_"], "labels": ["spleen"]},
}
IGNORE_LABEL = max(FULL_LABELS.values()) + 1  # nnU-Net: the ignore label must have the highest value
SPARSE_LABELS = {**FULL_LABELS, "ignore": IGNORE_LABEL}
DEFAULT_NAMES = {
    "full": "Phantom",
    "partial": "PhantomPartial",
    "sparse": "PhantomSparse",
    "multimodal": "PhantomMultimodal",
}
MIN_SHAPE = (16, 40, 40)
MAX_VOXELS = 128 * 512 * 512  # a case is built in memory as several float64 volumes
DEFAULT_SHAPE = (32, 64, 64)
DEFAULT_SPACING = (2.5, 1.2, 1.2)
FILE_ENDING = ".nii.gz"

# 6-connectivity (scipy's generate_binary_structure(3, 1)), built here so that importing the module (and
# `nnunet-ext phantoms --help`) does not import scipy.ndimage
_SIX = np.zeros((3, 3, 3), dtype=bool)
_SIX[1, 1, :] = _SIX[1, :, 1] = _SIX[:, 1, 1] = True

# Image profiles (ranges drawn per case; the same draws in the same order for every profile, so a seed gives
# the same anatomy in both). "standard": CT-like contrasts (liver and spleen 5-30 HU apart, noise 8-14 HU,
# thin vessels). "converge": the convergence-sized benchmark family (issue 20): the same anatomy with organs
# 60+ HU apart, larger tumours at 90-100 HU (hypodense in both hosts, in a band of their own between spleen
# and liver: with tumours 70-80 HU below their host, the first design, a liver tumour looked like spleen and a
# kidney tumour like liver, and whether a training ever learned the tumour was a seed lottery; a band below
# every tissue, -45..-35 HU, was no better, since nnU-Net's CT normalisation clips at the foreground's 0.5
# percentile, which put the tumours at the clip floor with fat and air), vessels of radius ~2 voxels, noise
# 3-5 HU and a 24 x 40 x 40 volume, so a small network learns every structure to a plateau within minutes.
PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "standard": {
        "liver": (105, 120),
        "kidney": (160, 190),
        "spleen": (88, 100),
        "tumour_drop": (40, 60),
        "noise": (8, 14),
        "vessel_radius": (1.0, 1.5),  # voxels in-plane
        "tumour_first": (0.3, 0.6),  # radius as a fraction of the host's largest inner distance
        "tumour_more": (0.2, 0.4),
        "tumour_kidney": (0.5, 0.9),
    },
    "converge": {
        "liver": (125, 135),
        "kidney": (200, 215),
        "spleen": (55, 65),
        "tumour_hu": (90, 100),
        "noise": (3, 5),
        "vessel_radius": (1.8, 2.2),
        "tumour_first": (0.45, 0.65),
        "tumour_more": (0.3, 0.45),
        "tumour_kidney": (0.6, 0.9),
    },
}
PROFILE_SHAPES = {"standard": DEFAULT_SHAPE, "converge": (24, 40, 40)}

# organ ids inside PhantomCase.organs (equal to the full label values)
LIVER, KIDNEY, SPLEEN = 1, 2, 3


@dataclass
class PhantomCase:
    """One generated case with its ground-truth parts.

    ``organs``: 0 none, 1 liver, 2 kidney, 3 spleen, *under* tumours and vessels (a tumour lies inside the
    organ given here). ``tumour_host``: 0 no tumour, else the organ id that hosts the tumour.
    ``vessel``: boolean mask. ``label_full`` composes them (tumour over organ, vessel over everything).
    """

    channels: list[np.ndarray]
    label_full: np.ndarray
    organs: np.ndarray
    tumour_host: np.ndarray
    vessel: np.ndarray


# ------------------------------------------------------------------------------------ generation


def _fourier_field(rng: np.random.Generator, grids, n: int = 6, max_freq: float = 1.2) -> np.ndarray:
    """A smooth random field with roughly unit standard deviation (sum of low-frequency cosines).

    Each cosine is the real part of a product of three 1D complex exponentials (cheap to broadcast)."""
    z, y, x = grids
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for _ in range(n):
        kz, ky, kx = rng.uniform(-max_freq, max_freq, 3) * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        ez = np.exp(1j * (kz * z + phase)).astype(np.complex64)
        field += (
            (ez * np.exp(1j * ky * y).astype(np.complex64)) * np.exp(1j * kx * x).astype(np.complex64)
        ).real
    return field * np.float32(np.sqrt(2.0 / n))


def _ellipsoid_f(grids, centre, radii, angle: float) -> np.ndarray:
    """Normalised ellipsoid function (< 1 inside), rotated by ``angle`` in the axial (y, x) plane."""
    z, y, x = grids
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    c, s = np.cos(angle), np.sin(angle)
    ry, rx = c * dy - s * dx, s * dy + c * dx
    return np.sqrt((dz / radii[0]) ** 2 + (ry / radii[1]) ** 2 + (rx / radii[2]) ** 2)


def _curve_mask(points_vox: np.ndarray, shape, spacing, radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` of a densely sampled curve (points in voxel coordinates)."""
    from scipy import ndimage

    mask = np.zeros(shape, dtype=bool)
    idx = np.rint(points_vox).astype(int)
    idx = idx[np.all((idx >= 0) & (idx < np.array(shape)), axis=1)]
    if len(idx) == 0:
        return mask
    pad = [int(np.ceil(radius_mm / sp)) + 1 for sp in spacing]  # work in the curve's bounding box only
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, shape)
    seeds = np.zeros(tuple(hi - lo), dtype=bool)
    seeds[tuple((idx - lo).T)] = True
    dist = ndimage.distance_transform_edt(~seeds, sampling=spacing)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = dist <= radius_mm
    return mask


def _dense_curve(ctrl: np.ndarray, step: float = 0.25) -> np.ndarray:
    """Smooth curve through control points (voxel coordinates), sampled every ~``step`` voxels."""
    from scipy.interpolate import make_interp_spline

    chord = np.r_[0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
    keep = np.r_[True, np.diff(chord) > 1e-6]
    ctrl, chord = ctrl[keep], chord[keep]
    if len(ctrl) < 2:
        return ctrl
    spline = make_interp_spline(chord, ctrl, k=min(3, len(ctrl) - 1))
    t = np.linspace(0, chord[-1], max(2, int(np.ceil(chord[-1] * 1.5 / step))))
    return spline(t)


def _place_tumour(
    rng, inner: np.ndarray, edt: np.ndarray, spacing, grids_mm, frac=(0.35, 0.7)
) -> np.ndarray | None:
    """A lumpy sphere strictly inside a host organ: within ``inner`` (the host eroded by its 6-neighbourhood,
    so every 6-neighbour of a tumour voxel is a host voxel); ``edt`` is the host's distance map in mm."""
    if not inner.any():
        return None
    dmax = float(edt.max())
    radius = max(rng.uniform(*frac) * dmax, 1.6 * min(spacing))
    cand = np.flatnonzero(inner & (edt >= 0.6 * radius))
    if len(cand) == 0:
        cand = np.flatnonzero(inner)
    centre = np.unravel_index(rng.choice(cand), edt.shape)
    zc, yc, xc = (centre[i] * spacing[i] for i in range(3))
    zm, ym, xm = grids_mm
    dist = np.sqrt((zm - zc) ** 2 + (ym - yc) ** 2 + (xm - xc) ** 2)
    lumps = 1.0 + 0.15 * np.cos(rng.uniform(0.3, 0.8) * (zm + ym) + rng.uniform(0, 6.3)) * np.cos(
        rng.uniform(0.3, 0.8) * xm + rng.uniform(0, 6.3)
    )
    tumour = (dist < radius * lumps) & inner
    tumour[centre] = True
    return tumour


def make_case_parts(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    num_channels: int = 1,
    profile: str = "standard",
) -> PhantomCase:
    """Generate one case (see :class:`PhantomCase`). Channel 0 is CT (HU); channel 1, if asked, MR-like.
    ``profile``: the image profile (:data:`PROFILES`)."""
    from scipy import ndimage

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}, got {profile!r}")
    prof = PROFILES[profile]
    if num_channels not in (1, 2):
        raise ValueError(f"num_channels must be 1 (CT) or 2 (CT + MR-like), got {num_channels}")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    nz, ny, nx = shape
    # normalised coordinates in [-1, 1] per axis (anatomy scales with the field of view)
    grids = (
        np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None],
        np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None],
        np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :],
    )
    z, y, x = grids
    grids_mm = tuple(
        (np.arange(n, dtype=np.float32) * sp).reshape(sh)
        for n, sp, sh in zip(shape, spacing, [(-1, 1, 1), (1, -1, 1), (1, 1, -1)])
    )

    # ---- body: elliptic cross-section (y = anterior-posterior, x = left-right), slightly varying with z
    ax, ay = rng.uniform(0.80, 0.92), rng.uniform(0.64, 0.76)
    by, bx = rng.normal(0, 0.03), rng.normal(0, 0.03)
    ay_z = ay * (1 + 0.05 * z) * np.where(y - by > 0, 0.92, 1.0)  # flatter back
    f_body = np.sqrt(((x - bx) / (ax * (1 + 0.04 * z))) ** 2 + ((y - by) / ay_z) ** 2)
    f_body = f_body + 0.025 * _fourier_field(rng, grids, n=4)
    body = f_body < 1.0
    muscle_wall = (f_body >= 0.82) & (f_body < 0.89)
    cavity = f_body < 0.80

    # ---- vertebra: cortical ring + marrow, posterior midline, all slices
    sy, sx, sr = by + 0.56 * ay, bx + rng.normal(0, 0.01), 0.12 * ax / 0.86
    r_spine = np.sqrt(((x - sx) / sr) ** 2 + ((y - sy) / sr) ** 2) + 0 * z
    spine = r_spine < 1.0
    marrow = r_spine < 0.72
    spine_zone = r_spine < 1.35  # organs keep a little fat around the spine

    # ---- organs: deformed ellipsoids; overlaps are split by the smallest normalised distance, so the
    # liver abuts the right kidney and the spleen the left kidney (shared boundaries, like real anatomy)
    s = ax / 0.86
    templates = [  # (organ id, centre z/y/x, radii z/y/x)
        (LIVER, (0.15, -0.05, -0.38), (0.75, 0.42, 0.36)),
        (KIDNEY, (-0.25, 0.33, -0.32), (0.50, 0.19, 0.16)),
        (KIDNEY, (-0.30, 0.35, 0.33), (0.50, 0.19, 0.16)),
        (SPLEEN, (0.30, 0.22, 0.50), (0.45, 0.22, 0.16)),
    ]
    fs, ids = [], []
    for organ_id, c, r in templates:
        centre = (
            c[0] + rng.normal(0, 0.08),
            by + c[1] * s + rng.normal(0, 0.03),
            bx + c[2] * s + rng.normal(0, 0.03),
        )
        radii = (
            r[0] * rng.uniform(0.85, 1.15),
            r[1] * s * rng.uniform(0.85, 1.15),
            r[2] * s * rng.uniform(0.85, 1.15),
        )
        f = _ellipsoid_f(grids, centre, radii, rng.normal(0, 0.2))
        fs.append(f + 0.10 * _fourier_field(rng, grids, n=5, max_freq=1.6))
        ids.append(organ_id)
    F = np.stack(fs)
    nearest = np.argmin(F, axis=0)
    inside = (np.min(F, axis=0) < 1.0) & cavity & ~spine_zone
    organs = np.where(inside, np.asarray(ids, dtype=np.uint8)[nearest], 0).astype(np.uint8)

    # ---- tumours (hypodense): 1-3 in the liver, 1 in a kidney; strictly inside their host organ
    tumour_host = np.zeros(shape, dtype=np.uint8)
    edts = {h: ndimage.distance_transform_edt(organs == h, sampling=spacing) for h in (LIVER, KIDNEY)}
    inners = {h: ndimage.binary_erosion(organs == h, _SIX) for h in (LIVER, KIDNEY)}
    for host_id, count in ((LIVER, int(rng.integers(1, 4))), (KIDNEY, 1)):
        for i in range(count):
            frac = (
                prof["tumour_more"]
                if i > 0
                else prof["tumour_first" if host_id == LIVER else "tumour_kidney"]
            )
            t = _place_tumour(rng, inners[host_id], edts[host_id], spacing, grids_mm, frac=frac)
            if t is not None:
                tumour_host[t & (tumour_host == 0)] = host_id

    # ---- vessels: thin contrast-bright tubes along smooth random curves
    r_mm = float(rng.uniform(*prof["vessel_radius"])) * min(spacing[1], spacing[2])
    zs = np.linspace(-0.5, nz - 0.5, 4 * nz)
    tz = 2 * (zs - zs.mean()) / max(1.0, nz)  # in [-1, 1]
    vy = (
        by
        + 0.56 * ay
        - 0.12 * ax / 0.86
        - rng.uniform(0.10, 0.16)
        + 0.04 * np.sin(rng.uniform(2, 5) * tz + rng.uniform(0, 6.3))
    )
    vx = bx + rng.uniform(-0.06, 0.08) + 0.05 * np.sin(rng.uniform(2, 5) * tz + rng.uniform(0, 6.3))
    pts = np.stack([zs, (vy + 1) / 2 * (ny - 1), (vx + 1) / 2 * (nx - 1)], axis=1)
    vessel = _curve_mask(pts, shape, spacing, r_mm) & cavity & ~spine_zone
    liver = organs == LIVER
    liver_edt = edts[LIVER]
    deep = (liver_edt > 0.3 * liver_edt.max()) & (tumour_host == 0)
    cand = np.flatnonzero(deep)
    if len(cand) >= 2:  # a hepatic vessel winding through the liver
        ctrl = np.array(
            np.unravel_index(rng.choice(cand, size=min(4, len(cand)), replace=False), shape), float
        ).T
        ctrl = ctrl[np.argsort(ctrl[:, 0] + 0.01 * ctrl[:, 2])]
        vessel |= _curve_mask(_dense_curve(ctrl), shape, spacing, r_mm) & liver & (tumour_host == 0)

    # ---- bowel loops (soft tissue with gas) in the free part of the cavity; background in the labels
    free = cavity & (organs == 0) & ~spine_zone & ~vessel
    bowel = np.zeros(shape, dtype=bool)
    gas = np.zeros(shape, dtype=bool)
    free_idx = np.flatnonzero(free)
    for _ in range(int(rng.integers(3, 7)) if len(free_idx) else 0):
        c = np.unravel_index(rng.choice(free_idx), shape)
        cn = (grids[0].ravel()[c[0]], grids[1].ravel()[c[1]], grids[2].ravel()[c[2]])
        rr = (rng.uniform(0.2, 0.5), rng.uniform(0.07, 0.13) * s, rng.uniform(0.07, 0.13) * s)
        fb = _ellipsoid_f(grids, cn, rr, rng.uniform(0, np.pi))
        bowel |= (fb < 1.0) & free
        gas |= (fb < 0.45) & free & (y < cn[1])
    bowel &= ~gas

    # ---- labels
    label = organs.copy()
    label[tumour_host > 0] = FULL_LABELS["tumour"]
    label[vessel] = FULL_LABELS["vessel"]

    # ---- intensities
    channels = [
        _render_ct(
            rng, grids, shape, body, muscle_wall, spine, marrow, bowel, gas, organs, tumour_host, vessel, prof
        )
    ]
    if num_channels >= 2:
        channels.append(
            _render_mr(
                rng, grids, shape, body, muscle_wall, spine, marrow, bowel, gas, organs, tumour_host, vessel
            )
        )
    return PhantomCase(channels, label.astype(np.uint8), organs, tumour_host, vessel)


def _textured(rng, grids, layers, amplitude: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, value + smooth texture) per layer; two texture fields shared with random signs (cheap)."""
    tex = [_fourier_field(rng, grids, n=5, max_freq=2.0) for _ in range(2)]
    out = []
    for i, (mask, value) in enumerate(layers):
        sign = 1.0 if rng.random() < 0.5 else -1.0
        out.append((mask, np.float32(value) + np.float32(sign * amplitude) * tex[i % 2][mask]))
    return out


def _paint(img: np.ndarray, layers) -> None:
    for mask, values in layers:
        img[mask] = values


def _tumour_hu(rng, prof: dict, host_hu: float) -> float:
    """A tumour's mean HU: its host's minus a drop, or (a profile with ``tumour_hu``) a band of its own. One
    draw either way, so both profiles keep the same anatomy per seed."""
    if "tumour_hu" in prof:
        return float(rng.uniform(*prof["tumour_hu"]))
    return host_hu - float(rng.uniform(*prof["tumour_drop"]))


def _render_ct(
    rng, grids, shape, body, muscle_wall, spine, marrow, bowel, gas, organs, tumour_host, vessel, prof=None
):
    """Contrast-enhanced (portal-venous phase) CT in Hounsfield units, as in KiPA/AMOS/MOTS: air -1000,
    fat ~-100, muscle 40-55, liver 105-120, spleen 88-100, kidney 160-190, tumours hypodense, vessels ~290
    (the standard profile; ``prof``: another entry of :data:`PROFILES`)."""
    from scipy import ndimage

    prof = prof or PROFILES["standard"]
    mean = {
        "fat": rng.uniform(-110, -90),
        "muscle": rng.uniform(40, 55),
        "cortex": rng.uniform(600, 800),
        "marrow": rng.uniform(180, 280),
        "bowel": rng.uniform(15, 35),
        "liver": rng.uniform(*prof["liver"]),
        "kidney": rng.uniform(*prof["kidney"]),
        "spleen": rng.uniform(*prof["spleen"]),
        "vessel": rng.uniform(260, 320),
    }
    img = np.full(shape, -1000.0, dtype=np.float32)
    body_layers = [
        (body, mean["fat"]),
        (muscle_wall, mean["muscle"]),
        (spine, mean["cortex"]),
        (marrow, mean["marrow"]),
        (bowel, mean["bowel"]),
    ]
    _paint(img, _textured(rng, grids, body_layers, 4.0))
    img[gas] = rng.uniform(-980, -900)
    organ_layers = [
        (organs == LIVER, mean["liver"]),
        (organs == KIDNEY, mean["kidney"]),
        (organs == SPLEEN, mean["spleen"]),
    ]
    organ_layers += [
        (tumour_host == h, _tumour_hu(rng, prof, mean[k])) for h, k in ((LIVER, "liver"), (KIDNEY, "kidney"))
    ]
    _paint(img, _textured(rng, grids, organ_layers, 3.0))
    img[vessel] = mean["vessel"]
    img = ndimage.gaussian_filter(img, sigma=0.6)  # partial-volume blur; labels stay crisp
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=0.5)
    img += noise * np.float32(rng.uniform(*prof["noise"]) / max(float(noise.std()), 1e-6))  # correlated noise
    return img.astype(np.float32)


def _render_mr(rng, grids, shape, body, muscle_wall, spine, marrow, bowel, gas, organs, tumour_host, vessel):
    """T2-like MR (arbitrary units): bright fat and tumours, dark liver, flow-void vessels, bias field."""
    from scipy import ndimage

    img = np.zeros(shape, dtype=np.float32)
    layers = [
        (body, rng.uniform(550, 650)),
        (muscle_wall, rng.uniform(150, 220)),
        (spine, 80.0),
        (marrow, rng.uniform(350, 450)),
        (bowel, rng.uniform(350, 450)),
    ]
    _paint(img, _textured(rng, grids, layers, 20.0))
    img[gas] = 0.0
    layers = [
        (organs == LIVER, rng.uniform(220, 280)),
        (organs == KIDNEY, rng.uniform(500, 580)),
        (organs == SPLEEN, rng.uniform(420, 480)),
        (tumour_host > 0, rng.uniform(750, 900)),
    ]
    _paint(img, _textured(rng, grids, layers, 15.0))
    img[vessel] = rng.uniform(40, 80)
    img *= np.exp(0.15 * _fourier_field(rng, grids, n=3, max_freq=0.8))  # coil bias field
    img = ndimage.gaussian_filter(img, sigma=0.6)
    sigma = np.float32(rng.uniform(15, 25))
    n1, n2 = rng.standard_normal((2, *shape), dtype=np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)  # Rician magnitude noise


def make_case(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    num_channels: int = 1,
) -> tuple[list[np.ndarray], np.ndarray]:
    """One case: (list of float32 (z, y, x) channels, uint8 full label map with :data:`FULL_LABELS`)."""
    case = make_case_parts(rng, shape, spacing, num_channels)
    return case.channels, case.label_full


def make_parcellation(
    rng: np.random.Generator,
    shape: Sequence[int] = (48, 96, 96),
    spacing: Sequence[float] = (2.0, 1.0, 1.0),
    num_labels: int = 24,
    warp_mm: float = 6.0,
) -> np.ndarray:
    """A synthetic atlas-like parcellation: ``num_labels`` adjacent, irregular, non-convex regions (labels
    1..num_labels) tiling a smooth blob-shaped "organ", background 0 outside it (the label-propagation benchmark
    of many adjacent regions, benchmarks/bench_labelprop.py).

    The regions are the Voronoi cells (in mm, so anisotropic ``spacing`` is respected) of random seeds inside the
    organ, taken at WARPED positions ``p + u(p)``: ``u`` is a smooth random displacement field (three random
    Fourier fields, a coarse one of amplitude ``warp_mm`` that bends the cells' faces into non-convex shapes and
    a finer one of ``warp_mm / 3`` that makes their boundaries irregular). Seeds are at least about half a cell
    apart, so every label is present. Deterministic given ``rng``'s state.
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(v) for v in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
        raise ValueError(f"shape needs 3 sizes >= 8 and spacing 3 positive values, got {shape}, {spacing}")
    if num_labels < 1 or num_labels > 255:
        raise ValueError(f"num_labels must be in 1..255, got {num_labels}")
    norm = tuple(
        np.linspace(-1, 1, n, dtype=np.float32).reshape(sh)
        for n, sh in zip(shape, [(-1, 1, 1), (1, -1, 1), (1, 1, -1)])
    )
    half = [0.5 * (n - 1) * sp for n, sp in zip(shape, spacing)]  # mm from the centre to the edge per axis
    mm = tuple(g * np.float32(h) for g, h in zip(norm, half))
    # the organ: an ellipsoid filling ~85 % of each extent, its surface bent by a smooth field
    radii = rng.uniform(0.78, 0.9, 3)
    f = np.sqrt(sum((g / r) ** 2 for g, r in zip(norm, radii))) + 0.06 * _fourier_field(
        rng, norm, n=6, max_freq=1.5
    )
    organ = f < 1.0
    # displacement field (mm): coarse and fine components per axis
    disp = [
        warp_mm * _fourier_field(rng, norm, n=8, max_freq=2.0)
        + (warp_mm / 3) * _fourier_field(rng, norm, n=8, max_freq=5.0)
        for _ in range(3)
    ]
    warped = [(m + d).reshape(-1)[organ.reshape(-1)] for m, d in zip(mm, disp)]
    # seeds: random organ voxels, greedily kept at least ~half a cell apart (so every cell is a region)
    coords = np.stack([np.broadcast_to(m, shape)[organ] for m in mm], axis=1)
    cell = (coords.shape[0] * float(np.prod(spacing)) / num_labels) ** (1 / 3)
    seeds: list[np.ndarray] = []
    for idx in rng.permutation(coords.shape[0]):
        if all(np.linalg.norm(coords[idx] - c) >= 0.6 * cell for c in seeds):
            seeds.append(coords[idx])
            if len(seeds) == num_labels:
                break
    if len(seeds) < num_labels:
        raise ValueError(
            f"could not place {num_labels} separated regions in a {shape} volume; use fewer labels"
        )
    best = np.full(warped[0].shape, np.inf, dtype=np.float32)
    owner = np.zeros(warped[0].shape, dtype=np.uint8)
    for i, c in enumerate(seeds, start=1):
        d = sum((w - np.float32(ci)) ** 2 for w, ci in zip(warped, c))
        closer = d < best
        best[closer], owner[closer] = d[closer], i
    out = np.zeros(shape, dtype=np.uint8)
    out[organ] = owner
    return out


def partial_truth(case: PhantomCase) -> np.ndarray:
    """Every structure of the partial label space (:data:`PARTIAL_LABELS`). Vessels are no structure there:
    they take the label of the tissue they run through."""
    out = np.zeros(case.organs.shape, dtype=np.uint8)
    out[case.organs == LIVER] = PARTIAL_LABELS["liver"]
    out[case.organs == KIDNEY] = PARTIAL_LABELS["kidney"]
    out[case.organs == SPLEEN] = PARTIAL_LABELS["spleen"]
    out[case.tumour_host == LIVER] = PARTIAL_LABELS["liver_tumour"]
    out[case.tumour_host == KIDNEY] = PARTIAL_LABELS["kidney_tumour"]
    return out


def sparse_slices(num_slices: int, every: int, offset: int) -> np.ndarray:
    """Indices of the annotated axial slices: offset, offset + every, ..."""
    return np.arange(offset % every, num_slices, every)


# -------------------------------------------------------------------------------------- datasets


def default_name(kind: str) -> str:
    return DEFAULT_NAMES[kind]


def _case_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def _validate(kind, dataset_id, name, num_train, num_test, shape, spacing, seed, every) -> tuple:
    if kind not in KINDS:
        raise UserError(f"unknown phantom kind {kind!r}; choose one of {list(KINDS)}.")
    if (
        isinstance(dataset_id, bool)
        or not isinstance(dataset_id, (int, np.integer))
        or not 1 <= dataset_id <= 999
    ):
        raise UserError(
            f"dataset id must be an integer from 1 to 999 (nnU-Net uses 3 digits), got {dataset_id!r}."
        )
    check_dataset_id_and_name(dataset_id, str(name))
    min_train = len(PARTIAL_TASKS) if kind == "partial" else 2
    if int(num_train) < min_train:
        why = " (one per task: liver, kidney, spleen)" if kind == "partial" else ""
        raise UserError(f"--num-train must be at least {min_train}{why}, got {num_train}.")
    if int(num_test) < 0:
        raise UserError(f"--num-test must be 0 or more, got {num_test}.")
    if len(shape) != 3 or any(int(s) < m for s, m in zip(shape, MIN_SHAPE)):
        raise UserError(
            f"--shape {tuple(shape)} is too small for the organs, tumours and vessels; use at least "
            f"{' '.join(map(str, MIN_SHAPE))} (Z Y X), e.g. the default {' '.join(map(str, DEFAULT_SHAPE))}."
        )
    if int(np.prod([int(s) for s in shape])) > MAX_VOXELS:
        raise UserError(
            f"--shape {tuple(shape)} has {int(np.prod([int(s) for s in shape])):,} voxels per case; phantoms are "
            f"generated in memory, so at most {MAX_VOXELS:,} (e.g. 128 512 512); pick a smaller --shape."
        )
    if len(spacing) != 3 or not all(np.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise UserError(
            f"--spacing needs three positive numbers Z Y X in mm (e.g. 2.5 1.2 1.2), got {spacing}."
        )
    if int(seed) < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}.")
    if kind == "sparse" and not 2 <= int(every) <= int(shape[0]):
        raise UserError(
            f"--every must be between 2 and the number of slices ({shape[0]}), got {every}: every k-th slice is "
            f"annotated (1 would be fully annotated: use kind 'full')."
        )
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing)


def _dataset_json(kind, folder_name, num_train, num_test, shape, spacing, seed, every) -> dict:
    labels = {
        "full": FULL_LABELS,
        "multimodal": FULL_LABELS,
        "partial": PARTIAL_LABELS,
        "sparse": SPARSE_LABELS,
    }
    channels = {"0": "CT", "1": "MR"} if kind == "multimodal" else {"0": "CT"}
    description = {
        "full": "fully labelled",
        "multimodal": "fully labelled, two channels (CT, T2-like MR)",
        "partial": "partially labelled (MOTS-like tasks; labelsTr_full/ and labelsTs/ hold every structure)",
        "sparse": f"every {every}th axial slice labelled, the rest 'ignore' (labelsTr_dense/ holds the truth)",
    }[kind]
    dj = {
        "name": folder_name.split("_", 1)[1],
        "description": f"Synthetic abdomen-like CT phantom (nnunet_ext.tools.phantoms), {description}.",
        "reference": "nnunet_ext.tools.phantoms (synthetic, generated)",
        "licence": "CC0-1.0",
        "channel_names": channels,
        "labels": dict(labels[kind]),
        "numTraining": int(num_train),
        "file_ending": FILE_ENDING,
        "nnunet_ext_phantom": {
            "kind": kind,
            "seed": int(seed),
            "shape": list(shape),
            "spacing": list(spacing),
            "num_test": int(num_test),
        },
    }
    if kind == "sparse":
        dj["nnunet_ext_phantom"]["every"] = int(every)
    if kind == "partial":
        dj["nnunet_ext_tasks"] = {
            k: {"prefixes": list(v["prefixes"]), "labels": list(v["labels"])}
            for k, v in PARTIAL_TASKS.items()
        }
    return dj


def _case_ids(kind: str, num_train: int, num_test: int) -> tuple[list[str], list[str]]:
    if kind == "partial":
        tasks = list(PARTIAL_TASKS)
        ids = [f"{tasks[i % len(tasks)]}_{i:03d}" for i in range(num_train + num_test)]
    else:
        ids = [f"phantom_{i:03d}" for i in range(num_train + num_test)]
    return ids[:num_train], ids[num_train:]


def write_phantom_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int,
    kind: str = "full",
    name: str | None = None,
    num_train: int = 12,
    num_test: int = 4,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] = DEFAULT_SPACING,
    seed: int = 0,
    every: int = 4,
    force: bool = False,
    progress: bool = False,
    profile: str = "standard",
) -> Path:
    """Write ``raw_root/Dataset{id:03d}_{name}`` (an nnU-Net raw dataset) and return its path.

    Refuses (UserError) if any dataset with that id exists under ``raw_root`` unless ``force``, which
    replaces it. The dataset is written into a hidden temporary folder beside the target and renamed at the
    end, so an interrupted run leaves nothing half-written. ``every`` is used by ``kind='sparse'`` only.
    ``profile``: the image profile (:data:`PROFILES`; "converge" for the convergence benchmarks); ``shape``
    defaults to the profile's (:data:`PROFILE_SHAPES`).
    """
    if profile not in PROFILES:
        raise UserError(f"unknown phantom profile {profile!r}; choose one of {list(PROFILES)}.")
    shape = PROFILE_SHAPES[profile] if shape is None else shape
    name = default_name(kind) if name is None and kind in KINDS else name
    shape, spacing = _validate(kind, dataset_id, name, num_train, num_test, shape, spacing, seed, every)
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    dataset_json = _dataset_json(kind, folder_name, num_train, num_test, shape, spacing, seed, every)
    dataset_json["nnunet_ext_phantom"]["profile"] = profile
    train_ids, test_ids = _case_ids(kind, int(num_train), int(num_test))
    registry = None
    if kind == "partial":
        from nnunet_ext.multitask.tasks import load_task_registry

        registry = load_task_registry(dataset_json, train_ids)
    num_channels = 2 if kind == "multimodal" else 1

    with RawDatasetWriter(raw_root, int(dataset_id), str(name), force) as writer:
        cases = [(cid, i, True) for i, cid in enumerate(train_ids)]
        cases += [(cid, len(train_ids) + j, False) for j, cid in enumerate(test_ids)]
        iterator = progress_bar(cases, folder_name, progress)
        for cid, index, is_train in iterator:
            case = make_case_parts(_case_rng(seed, index), shape, spacing, num_channels, profile)
            images = "imagesTr" if is_train else "imagesTs"
            for c, channel in enumerate(case.channels):
                writer.write_array(channel, images, f"{cid}_{c:04d}{FILE_ENDING}", spacing)
            label = f"{cid}{FILE_ENDING}"
            if kind == "partial":
                truth = partial_truth(case)
                if is_train:
                    keep = registry.labels_of(registry.task_of(cid))
                    partial = np.where(np.isin(truth, keep), truth, 0).astype(np.uint8)
                    writer.write_array(partial, "labelsTr", label, spacing)
                    writer.write_array(truth, "labelsTr_full", label, spacing)
                else:
                    writer.write_array(truth, "labelsTs", label, spacing)
            elif kind == "sparse" and is_train:
                offset = int(_case_rng(seed, index, 1).integers(int(every)))
                sparse = np.full(shape, IGNORE_LABEL, dtype=np.uint8)
                sl = sparse_slices(shape[0], int(every), offset)
                sparse[sl] = case.label_full[sl]
                writer.write_array(sparse, "labelsTr", label, spacing)
                writer.write_array(case.label_full, "labelsTr_dense", label, spacing)
            else:
                writer.write_array(case.label_full, "labelsTr" if is_train else "labelsTs", label, spacing)
        return writer.finish(dataset_json)  # old datasets with this id go only now


# ------------------------------------------------------------------------------------------- CLI


def _cmd_phantoms(args: argparse.Namespace) -> int:
    out = args.out or os.environ.get("nnUNet_raw")
    if not out:
        raise UserError(
            "no output folder: nnUNet_raw is not set and --out was not given. Run "
            "`export nnUNet_raw=/path/to/nnUNet_raw` (where nnU-Net looks for raw datasets) or pass --out DIR."
        )
    kind = args.kind
    folder = write_phantom_dataset(
        out,
        args.id,
        kind=kind,
        name=args.name,
        num_train=args.num_train,
        num_test=args.num_test,
        shape=args.shape,
        spacing=args.spacing,
        seed=args.seed,
        every=getattr(args, "every", 4),
        force=args.force,
        progress=True,
        profile=args.profile,
    )
    shape = tuple(args.shape or PROFILE_SHAPES[args.profile])
    dj = {"full": FULL_LABELS, "multimodal": FULL_LABELS, "partial": PARTIAL_LABELS, "sparse": SPARSE_LABELS}[
        kind
    ]
    print(f"wrote {folder}")
    print(
        f"  {args.num_train} training + {args.num_test} test cases, shape (z, y, x) {shape}, "
        f"spacing {tuple(args.spacing)} mm, seed {args.seed}, profile {args.profile}"
    )
    print(f"  labels: {dj}")
    if kind == "partial":
        print(
            "  tasks: "
            + ", ".join(
                f"{t} ({v['prefixes'][0]}*: {', '.join(v['labels'])})" for t, v in PARTIAL_TASKS.items()
            )
        )
        print(
            "  labelsTr holds each case's task labels only; labelsTr_full/ and labelsTs/ hold every structure"
        )
    if kind == "sparse":
        print(
            f"  labelsTr: every {args.every}th axial slice annotated, others = ignore ({IGNORE_LABEL}); "
            f"dense truth in labelsTr_dense/"
        )
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(var)
        if root and Path(root).is_dir():
            stale = [p.name for p in Path(root).glob(f"Dataset{args.id:03d}_*") if p.is_dir()]
            if stale:
                print(
                    f"  note: {var} already has {stale}; remove or re-run preprocessing/training so that it "
                    f"matches the new data (nnU-Net refuses an id with two names).",
                    file=sys.stderr,
                )
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.id} --verify_dataset_integrity -c 3d_fullres")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``nnunet-ext phantoms {full,partial,sparse,multimodal}``."""
    parser = subparsers.add_parser(
        "phantoms",
        help="write a synthetic abdomen-like CT phantom dataset (nnU-Net raw format)",
        description="Write a synthetic abdomen-like CT phantom as an nnU-Net raw dataset (see docs/phantoms.md).",
    )
    sub = parser.add_subparsers(dest="kind", metavar="{" + ",".join(KINDS) + "}")
    sub.required = True
    helps = {
        "full": "fully labelled (liver, kidney, spleen, tumour, vessel)",
        "partial": "MOTS-like partially labelled tasks with a task registry",
        "sparse": "COSMOS-like: every k-th axial slice labelled, the rest nnU-Net's ignore label",
        "multimodal": "two channels (CT + MR-like), fully labelled",
    }
    for kind in KINDS:
        p = sub.add_parser(kind, help=helps[kind], description=helps[kind])
        p.add_argument("-d", "--id", type=int, required=True, help="nnU-Net dataset id (1-999)")
        p.add_argument("--name", default=None, help=f"dataset name (default {DEFAULT_NAMES[kind]})")
        p.add_argument("--num-train", type=int, default=12, help="training cases (default 12)")
        p.add_argument("--num-test", type=int, default=4, help="test cases (default 4)")
        p.add_argument(
            "--shape",
            type=int,
            nargs=3,
            metavar=("Z", "Y", "X"),
            default=None,
            help=f"volume shape (default {' '.join(map(str, DEFAULT_SHAPE))}; with --profile converge "
            f"{' '.join(map(str, PROFILE_SHAPES['converge']))})",
        )
        p.add_argument(
            "--spacing",
            type=float,
            nargs=3,
            metavar=("Z", "Y", "X"),
            default=list(DEFAULT_SPACING),
            help="voxel spacing in mm (default %(default)s)",
        )
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument(
            "--profile",
            choices=list(PROFILES),
            default="standard",
            help="image profile: standard (CT-like contrasts, default) or converge (the same anatomy with high "
            "contrast, low noise, larger tumours and thicker vessels, small: the convergence benchmarks, "
            "docs/phantoms.md)",
        )
        if kind == "sparse":
            p.add_argument("--every", type=int, default=4, help="annotate every K-th axial slice (default 4)")
        p.add_argument("--force", action="store_true", help="replace an existing dataset with this id")
        p.add_argument("--out", default=None, help="raw data folder (default $nnUNet_raw)")
        p.set_defaults(func=_cmd_phantoms)
    return parser
