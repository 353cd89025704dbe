"""Label propagation (nnunet_ext.labelprop.propagate): interpolation with known answers, datasets, bad input, pseudo-labels,
QC figures, trainers, and the whole recipe through the stock nnU-Net CLIs on a tiny sparse phantom."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from support.commands import run, training_env
from support.paths import DATA

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import atomic_write_image, atomic_write_json
from nnunet_ext.labelprop.propagate import (
    annotated_slices_of,
    detect_axis,
    interpolate_dataset,
    interpolate_nearest,
    interpolate_shape,
    interpolate_volume,
    load_sparse_dataset,
    merge_annotations,
)

IGN = 9


def disk(shape, centre, radius, spacing=(1.0, 1.0)):
    yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    cy, cx = centre[0] * spacing[0], centre[1] * spacing[1]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


# ------------------------------------------------------------------------------------------ interpolation
def test_nearest_copies_nearest_slice_ties_to_lower():
    stack = np.zeros((9, 4, 4), np.uint8)
    stack[1], stack[5], stack[8] = 1, 2, 3
    out = interpolate_nearest(stack, [1, 5, 8])
    # slice 3 is halfway between 1 and 5: the LOWER (1) wins; 2 -> 1, 4 -> 5; 6 -> 5, 7 -> 8
    assert [int(out[s, 0, 0]) for s in range(9)] == [0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert np.array_equal(out[[1, 5, 8]], stack[[1, 5, 8]])


def test_shape_recovers_linearly_growing_disk_radius():
    n, size = 9, 64
    stack = np.zeros((n, size, size), np.uint8)
    r0, r8 = 6.0, 22.0
    stack[0][disk((size, size), (32, 32), r0)] = 1
    stack[8][disk((size, size), (32, 32), r8)] = 1
    out = interpolate_shape(stack, [0, 8])
    for s in range(1, 8):
        r = r0 + (r8 - r0) * s / 8
        truth = disk((size, size), (32, 32), r)
        assert dice(out[s] == 1, truth) > 0.97, s
        radius = np.sqrt((out[s] == 1).sum() / np.pi)
        assert abs(radius - r) < 0.75, (s, radius, r)
    # nearest cannot do that: it jumps at the middle
    near = interpolate_nearest(stack, [0, 8])
    assert dice(near[3] == 1, disk((size, size), (32, 32), r0 + (r8 - r0) * 3 / 8)) < 0.8


def test_shape_uses_in_plane_spacing():
    stack = np.zeros((5, 40, 80), np.uint8)
    sp = (2.0, 1.0)  # y voxels are twice as large: a disk of radius 16 mm spans 8 voxels in y
    stack[0][disk((40, 80), (20, 40), 8.0, sp)] = 1
    stack[4][disk((40, 80), (20, 40), 16.0, sp)] = 1
    out = interpolate_shape(stack, [0, 4], sampling=sp)
    assert dice(out[2] == 1, disk((40, 80), (20, 40), 12.0, sp)) > 0.95


def test_shape_keeps_three_labels_exclusive_and_complete():
    n, size = 7, 48
    stack = np.zeros((n, size, size), np.uint8)
    # three touching squares that shift between the two annotated slices
    for s, shift in ((0, 0), (6, 8)):
        stack[s, 8:40, 4 + shift : 16 + shift] = 1
        stack[s, 8:40, 16 + shift : 28 + shift] = 2
        stack[s, 8:40, 28 + shift : 40] = 3
    out = interpolate_shape(stack, [0, 6])
    for s in range(1, 6):
        values = set(np.unique(out[s]).tolist())
        assert values <= {0, 1, 2, 3} and {1, 2, 3} <= values
        # one label per voxel by construction; the shared boundaries move monotonically with the shift
        cols_2 = np.flatnonzero((out[s] == 2).any(axis=0))
        assert 16 <= cols_2.min() <= 24 and 28 <= cols_2.max() + 1 <= 36
    # label 3 shrinks from 12 to 4 columns, label 1 keeps 12 columns
    assert (out[3] == 1).any(axis=0).sum() in (11, 12, 13)
    assert (out[5] == 3).sum() < (out[1] == 3).sum()


def test_shape_structure_absent_on_one_side_vanishes_halfway():
    stack = np.zeros((9, 40, 40), np.uint8)
    stack[0][disk((40, 40), (20, 20), 10)] = 1
    out = interpolate_shape(stack, [0, 8])
    areas = [(out[s] == 1).sum() for s in range(9)]
    assert all(a >= b for a, b in zip(areas, areas[1:]))  # shrinks monotonically
    assert areas[3] > 0 and areas[4] == 0 and areas[5] == 0  # gone at the midpoint (nearest drops it after 4)


def _random_label_stack(rng, n, h, w, k):
    """Smooth random blobs with ``k`` labels (label 0 the most frequent)."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.normal(size=(n, h, w)), (1, 3, 3))
    levels = np.quantile(f, np.linspace(0.5 + 0.4 * rng.random(), 1, k + 1)[:-1])
    return np.digitize(f, levels).astype(np.uint8)


def test_shape_crop_gives_the_whole_slice_output(monkeypatch):
    """Cropping each gap to the labels' bounding box (+ margin) changes nothing: labels touching the slice
    edges, background-only and label-filled end slices, anisotropic sampling, several gap lengths."""
    import nnunet_ext.labelprop.propagate as lp

    rng = np.random.default_rng(0)
    for trial in range(24):
        n, h, w = int(rng.integers(6, 13)), int(rng.integers(10, 48)), int(rng.integers(10, 48))
        stack = _random_label_stack(rng, n, h, w, int(rng.integers(1, 5)))
        if trial % 3 == 0:
            stack[:, : h // 3] = 0  # labels away from one edge
        if trial % 4 == 1:
            stack[2] = 0  # background only
        if trial % 5 == 2:
            stack[3] = 1  # one label fills the slice
        ann = list(range(int(rng.integers(0, 2)), n, int(rng.integers(2, 5))))
        sp = [(1.0, 1.0), (0.8, 0.8), (2.0, 0.7), (0.6, 1.3)][trial % 4]
        assert np.array_equal(
            interpolate_shape(stack, ann, sp), interpolate_shape(stack, ann, sp, crop=False)
        )
    # and it does crop: a small structure in a large slice gets distance maps of the structure's size only
    shapes = []
    real = lp._signed_distance
    monkeypatch.setattr(lp, "_signed_distance", lambda m, s: shapes.append(m.shape) or real(m, s))
    stack = np.zeros((5, 200, 300), np.uint8)
    stack[0][disk((200, 300), (50, 60), 6)] = 1
    stack[4][disk((200, 300), (54, 62), 8)] = 2
    out = interpolate_shape(stack, [0, 4])
    assert shapes and all(y <= 20 + 2 * lp.SHAPE_MARGIN and x <= 20 + 2 * lp.SHAPE_MARGIN for y, x in shapes)
    assert np.array_equal(out, interpolate_shape(stack, [0, 4], crop=False))


def test_distance_maps_on_the_mask_box_equal_scipy_on_the_whole_slice():
    """_edt_near (the distance transform inside the box of the mask's voxels + 1) is scipy's on the whole slice:
    masks touching edges and corners, one voxel, thin lines, anisotropic sampling."""
    from scipy.ndimage import distance_transform_edt

    import nnunet_ext.labelprop.propagate as lp

    rng = np.random.default_rng(1)
    masks = []
    for trial in range(40):
        h, w = int(rng.integers(3, 40)), int(rng.integers(3, 40))
        mask = np.ones((h, w), bool)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < [0.0, 0.3, 0.9][trial % 3]
        masks.append(mask)
    one = np.ones((9, 7), bool)
    one[4, 3] = False
    line = np.ones((9, 7), bool)
    line[:, 0] = False
    corner = np.zeros((9, 7), bool)
    corner[0, 0] = True
    masks += [one, line, ~line, corner, ~corner]
    for i, mask in enumerate(masks):
        if mask.all():  # no zero: no distance to one (never asked for: _signed_distance refuses it)
            continue
        sp = [(1.0, 1.0), (0.8, 0.8), (2.0, 0.7), (0.6, 1.3)][i % 4]
        assert np.array_equal(lp._edt_near(mask, sp), distance_transform_edt(mask, sampling=sp)), i


def test_shape_crop_reproduces_the_whole_slice_implementation_of_e377ef9():
    """Frozen outputs of the implementation before the crop (tests/data/labelprop/README.md)."""
    ref = np.load(DATA / "labelprop" / "shape_whole_slices_e377ef9.npz")
    assert np.array_equal(interpolate_shape(ref["a"], ref["ann_a"].tolist()), ref["out_a"])
    sp = tuple(ref["sampling_b"].tolist())
    assert np.array_equal(interpolate_shape(ref["b"], ref["ann_b"].tolist(), sp), ref["out_b"])


def test_parcellation_phantom_many_adjacent_nonconvex_regions():
    """phantoms.make_parcellation (the benchmark case of many adjacent irregular labels): deterministic, every
    region present, regions touch each other, several are clearly non-convex; shape beats nearest on it."""
    from scipy.spatial import ConvexHull

    from nnunet_ext.tools.phantoms import make_parcellation

    sp = (2.0, 1.0, 1.0)
    lab = make_parcellation(np.random.default_rng(4), (24, 48, 48), sp, num_labels=10)
    assert np.array_equal(lab, make_parcellation(np.random.default_rng(4), (24, 48, 48), sp, num_labels=10))
    assert lab.dtype == np.uint8 and set(np.unique(lab).tolist()) == set(range(11))
    assert lab[0, 0, 0] == 0 and (lab > 0).mean() > 0.2
    # adjacency: label pairs that share a face (background left out)
    pairs = set()
    for ax in range(3):
        a, b = np.moveaxis(lab, ax, 0)[:-1].ravel(), np.moveaxis(lab, ax, 0)[1:].ravel()
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist())}
    assert all(sum(k in p for p in pairs) >= 2 for k in range(1, 11))
    solidity = [(lab == k).sum() * 2.0 / ConvexHull(np.argwhere(lab == k) * sp).volume for k in range(1, 11)]
    assert sum(v < 0.8 for v in solidity) >= 3, solidity
    # the benchmark's finding in miniature: shape beats nearest on the propagated slices (every 4th annotated)
    ann = list(range(0, 24, 4))
    sparse = np.full_like(lab, 11)
    sparse[ann] = lab[ann]
    prop = [s for s in range(ann[-1]) if s % 4]
    score = {}
    for method in ("nearest", "shape"):
        out = interpolate_volume(sparse, ann, 0, method, sp, "ignore", 11)
        score[method] = np.mean([dice(lab[prop] == k, out[prop] == k) for k in range(1, 11)])
    assert score["shape"] > score["nearest"] + 0.03, score


def test_interpolate_volume_axis_outside_and_annotated_kept():
    rng = np.random.default_rng(0)
    vol = np.full((6, 10, 12), IGN, np.uint8)
    ann = [1, 4]
    for a in ann:
        vol[:, :, a] = rng.integers(0, 3, size=(6, 10))  # slices along x (axis 2)
    for method in ("nearest", "shape"):
        out = interpolate_volume(vol, ann, axis=2, method=method, outside="ignore", ignore_label=IGN)
        assert np.array_equal(out[:, :, ann], vol[:, :, ann])
        assert np.all(out[:, :, 0] == IGN) and np.all(out[:, :, 5:] == IGN)
        assert not np.any(out[:, :, 1:5] == IGN)
        out_bg = interpolate_volume(vol, ann, axis=2, method=method, outside="background", ignore_label=IGN)
        assert np.all(out_bg[:, :, 0] == 0) and not np.any(out_bg == IGN)


def test_detect_axis_and_annotated_slices():
    vol = np.full((8, 6, 5), IGN, np.uint8)
    vol[:, 2] = 1
    vol[:, 5] = 0
    assert detect_axis(vol, IGN) == [1]
    assert annotated_slices_of(vol, 1, IGN) == ([2, 5], [])
    vol[0, 0, 0] = 2  # a stray label on an ignore slice: slices no longer whole
    assert detect_axis(vol, IGN) == []
    ann, partial = annotated_slices_of(vol, 1, IGN)
    assert ann == [0, 2, 5] and partial == [0]


def test_merge_annotations_keeps_annotated_voxels_exactly():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=(10, 8, 8)).astype(np.uint8)
    sparse = np.full_like(pred, IGN)
    sparse[[2, 7]] = rng.integers(0, 3, size=(2, 8, 8))
    merged = merge_annotations(pred, sparse, [2, 7], axis=0, ignore_label=IGN)
    assert np.array_equal(merged[[2, 7]], sparse[[2, 7]])
    others = [s for s in range(10) if s not in (2, 7)]
    assert np.array_equal(merged[others], pred[others])


# ------------------------------------------------------------------------------------------ datasets
def _toy_dataset(root: Path, dataset_id: int = 700, n_cases: int = 3, every: int = 3) -> Path:
    """Tiny raw dataset: a sphere whose axial slices are annotated every ``every`` slices."""
    folder = root / f"Dataset{dataset_id:03d}_Toy"
    shape, spacing = (13, 24, 24), (2.0, 1.0, 1.0)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    for i in range(n_cases):
        case = f"toy_{i:03d}"
        dense = np.zeros(shape, np.uint8)
        dense[(zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= (8 + i) ** 2] = 1
        dense[(zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 15) ** 2 <= 9] = 2
        sparse = np.full(shape, 3, np.uint8)
        sl = np.arange(i % every, shape[0], every)
        sparse[sl] = dense[sl]
        image = dense.astype(np.float32) * 100 + np.random.default_rng(i).normal(0, 5, shape).astype(
            np.float32
        )
        atomic_write_image(folder / "imagesTr" / f"{case}_0000.nii.gz", image, spacing)
        atomic_write_image(folder / "labelsTr" / f"{case}.nii.gz", sparse, spacing)
        atomic_write_image(folder / "labelsTr_dense" / f"{case}.nii.gz", dense, spacing)
    atomic_write_json(
        folder / "dataset.json",
        {
            "name": "Toy",
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "ball": 1, "core": 2, "ignore": 3},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        },
    )
    return folder


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("method", ["nearest", "shape"])
def test_interpolate_dataset_writes_new_dataset(tmp_path, method):
    src = _toy_dataset(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    out = interpolate_dataset(src, 701, method, out=tmp_path, progress=False)
    assert out == tmp_path / f"Dataset701_ToyLP{method.capitalize()}"
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before  # source untouched
    dj = json.loads((out / "dataset.json").read_text())
    meta = json.loads((out / "labelprop.json").read_text())
    assert meta["method"] == method and meta["axis"] == 0
    for i in range(3):
        case = f"toy_{i:03d}"
        sparse, lab = _read(src / "labelsTr" / f"{case}.nii.gz"), _read(out / "labelsTr" / f"{case}.nii.gz")
        dense = _read(src / "labelsTr_dense" / f"{case}.nii.gz")
        ann = meta["cases"][case]["annotated"]
        assert ann == list(range(i % 3, 13, 3))
        assert np.array_equal(lab[ann], sparse[ann])
        inside = slice(ann[0], ann[-1] + 1)
        assert not np.any(lab[inside] == 3)
        assert np.all(lab[: ann[0]] == 3) and np.all(lab[ann[-1] + 1 :] == 3)
        assert dice(lab[inside] == 1, dense[inside] == 1) > 0.8
        img = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        assert img.GetSpacing() == (1.0, 1.0, 2.0)
    # some case has slices outside its annotated range -> ignore label kept
    assert dj["labels"] == {"background": 0, "ball": 1, "core": 2, "ignore": 3}
    # refuse to overwrite; --force replaces
    with pytest.raises(UserError, match="already exists"):
        interpolate_dataset(src, 701, method, out=tmp_path, progress=False)
    interpolate_dataset(src, 701, method, out=tmp_path, progress=False, force=True)
    assert not list(tmp_path.glob(".Dataset701*"))


def test_interpolate_dataset_reads_each_label_file_once(tmp_path, monkeypatch):
    """Checks and interpolation share one read per label file; a case with an axis given and a fully annotated
    case (no ignore voxel) come out right."""
    import nnunet_ext.labelprop.propagate as lp

    src = _toy_dataset(tmp_path)
    full = _read(src / "labelsTr_dense" / "toy_002.nii.gz")
    atomic_write_image(src / "labelsTr" / "toy_002.nii.gz", full, (2.0, 1.0, 1.0))  # fully annotated
    reads = []
    real = lp._read_labels
    monkeypatch.setattr(lp, "_read_labels", lambda path: reads.append(Path(path).name) or real(path))
    out = interpolate_dataset(src, 707, "shape", out=tmp_path, progress=False)
    assert sorted(reads) == ["toy_000.nii.gz", "toy_001.nii.gz", "toy_002.nii.gz"]
    assert np.array_equal(_read(out / "labelsTr" / "toy_002.nii.gz"), full)
    meta = json.loads((out / "labelprop.json").read_text())
    assert meta["axis"] == 0 and meta["cases"]["toy_002"]["annotated"] == list(range(13))


def test_interpolate_background_outside_drops_ignore_label(tmp_path):
    src = _toy_dataset(tmp_path)
    out = interpolate_dataset(src, 702, "nearest", outside="background", out=tmp_path, progress=False)
    dj = json.loads((out / "dataset.json").read_text())
    assert "ignore" not in dj["labels"]
    assert _read(out / "labelsTr" / "toy_002.nii.gz").max() <= 2


def test_annotated_slices_json_and_axis(tmp_path):
    src = _toy_dataset(tmp_path)
    # a dataset without ignore label: the annotated slices come from a JSON file
    dj = json.loads((src / "dataset.json").read_text())
    dj["labels"].pop("ignore")
    atomic_write_json(src / "dataset.json", dj)
    for i in range(3):
        p = src / "labelsTr" / f"toy_{i:03d}.nii.gz"
        lab = _read(p)
        lab[lab == 3] = 0
        atomic_write_image(p, lab, (2.0, 1.0, 1.0))
    spec = tmp_path / "slices.json"
    spec.write_text(json.dumps({f"toy_{i:03d}": list(range(i % 3, 13, 3)) for i in range(3)}))
    with pytest.raises(UserError, match="--axis"):
        interpolate_dataset(src, 703, "shape", annotated_slices=spec, out=tmp_path, progress=False)
    out = interpolate_dataset(
        src, 703, "shape", annotated_slices=spec, axis="z", out=tmp_path, progress=False
    )
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == 3  # new ignore label (max + 1) for the slices outside the range
    with pytest.raises(UserError, match="no ignore label"):
        interpolate_dataset(src, 704, "shape", out=tmp_path, progress=False)


def test_bad_inputs_listed_per_case_and_nothing_written(tmp_path):
    src = _toy_dataset(tmp_path, n_cases=6)
    spacing = (2.0, 1.0, 1.0)
    # toy_000: no annotated slice
    atomic_write_image(src / "labelsTr" / "toy_000.nii.gz", np.full((13, 24, 24), 3, np.uint8), spacing)
    # toy_001: a label value dataset.json does not know
    lab = _read(src / "labelsTr" / "toy_001.nii.gz")
    lab[lab == 1] = 7
    atomic_write_image(src / "labelsTr" / "toy_001.nii.gz", lab, spacing)
    # toy_002: image geometry differs from the label's
    img = _read(src / "imagesTr" / "toy_002_0000.nii.gz")
    atomic_write_image(src / "imagesTr" / "toy_002_0000.nii.gz", img, (3.0, 1.0, 1.0))
    # toy_003: one annotated slice partially ignore
    lab = _read(src / "labelsTr" / "toy_003.nii.gz")
    lab[0, :5] = 3
    atomic_write_image(src / "labelsTr" / "toy_003.nii.gz", lab, spacing)
    with pytest.raises(UserError) as err:
        interpolate_dataset(src, 705, "shape", out=tmp_path, progress=False)
    msg = str(err.value)
    assert "4 problem(s)" in msg and "nothing was written" in msg
    assert "toy_000: no annotated slice" in msg
    assert "toy_001: label values [7]" in msg
    assert "toy_002: image toy_002_0000.nii.gz and label differ in geometry (spacing" in msg
    assert "toy_003:" in msg and "partially" in msg
    assert "toy_004" not in msg and "toy_005" not in msg
    assert not list(tmp_path.glob("Dataset705*")) and not list(tmp_path.glob(".Dataset705*"))


def test_annotated_slices_ignore_only_is_an_error(tmp_path):
    src = _toy_dataset(tmp_path)
    spec = {f"toy_{i:03d}": list(range(i % 3, 13, 3)) for i in range(3)}
    spec["toy_001"] = [1, 2, 4]  # slice 2 is ignore-only in toy_001
    spec["toy_002"] = []
    spec["nope"] = [0]
    with pytest.raises(UserError) as err:
        load_sparse_dataset(src, annotated_slices=spec)
    msg = str(err.value)
    assert "toy_001: annotated slices [2] hold the ignore label only" in msg
    assert "toy_002: no annotated slice" in msg
    assert "nope" in msg


def test_cli_interpolate_and_qc(tmp_path):
    src = _toy_dataset(tmp_path)
    env = {**os.environ, "nnUNet_raw": str(tmp_path)}
    proc = run(["nnunet-ext", "labelprop", "interpolate", str(src), "--out-id", "706", "--quiet"], env)
    assert "Dataset706_ToyLPShape" in proc.stdout  # the default method
    qc = tmp_path / "qc"
    run(["nnunet-ext", "labelprop", "qc", "706", "-o", str(qc), "--quiet"], env)
    pngs = sorted(qc.glob("*.png"))
    assert [p.name for p in pngs] == ["toy_000.png", "toy_001.png", "toy_002.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # errors: exit 1 with the message, nothing written
    import subprocess

    exe = shutil.which("nnunet-ext", path=str(Path(os.sys.executable).parent))
    proc = subprocess.run(
        [exe, "labelprop", "interpolate", str(src), "--out-id", "706"],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--force" in proc.stderr


def test_pseudo_refuses_negative_worker_count(tmp_path):
    from nnunet_ext.labelprop.propagate import pseudo_label_dataset

    with pytest.raises(UserError, match="--num-processes must be 0"):
        pseudo_label_dataset(tmp_path, tmp_path, 5, num_processes=-1, out=tmp_path)
    assert not list(tmp_path.iterdir())


def _untrained_model(workspace, folder: Path) -> Path:
    """An nnU-Net model folder (plans, dataset.json, fold_0/checkpoint_final.pth) of a randomly initialised
    nnUNetTrainer network of the full phantom's 3d_tiny plans: no training needed to exercise prediction."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = workspace.dataset(501)
    plans = json.loads((workspace.root / "preprocessed" / dataset.name / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(
        pm, pm.get_configuration("3d_tiny"), 1, 6, enable_deep_supervision=False
    )
    (folder / "fold_0").mkdir(parents=True)
    atomic_write_json(folder / "plans.json", plans)
    atomic_write_json(folder / "dataset.json", dataset_json)
    torch.save(
        {
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_tiny"},
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "network_weights": net.state_dict(),
        },
        folder / "fold_0" / "checkpoint_final.pth",
    )
    return folder


@pytest.mark.slow  # plans the shared full phantom; nnU-Net's worker processes start (spawn) in ~10 s
def test_pseudo_labels_with_worker_processes_match_case_by_case(phantom_workspace, tmp_path, monkeypatch):
    """labelprop pseudo with nnU-Net's background preprocessing/export processes (-np 2) writes exactly what
    the case-by-case prediction (-np 0) writes, with the annotated voxels kept."""
    from nnunet_ext.labelprop.propagate import pseudo_label_dataset
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    for k in ("nnUNet_extTrainer", "nnUNet_compile", "nnUNet_def_n_proc"):
        monkeypatch.setenv(k, phantom_workspace.env[k])
    model = _untrained_model(phantom_workspace, tmp_path / "model")
    raw = tmp_path / "raw"
    src = write_phantom_dataset(
        raw, 572, kind="sparse", num_train=3, num_test=0, shape=(24, 48, 48), seed=5, every=4
    )
    kw = dict(folds=[0], device="cpu", tta=False, out=raw, progress=False)
    seq = pseudo_label_dataset(src, model, 573, num_processes=0, **kw)
    par = pseudo_label_dataset(src, model, 574, num_processes=2, **kw)
    meta = json.loads((par / "labelprop.json").read_text())
    assert sorted(meta["cases"]) == ["phantom_000", "phantom_001", "phantom_002"]
    for case, info in meta["cases"].items():
        a, b = _read(seq / "labelsTr" / f"{case}.nii.gz"), _read(par / "labelsTr" / f"{case}.nii.gz")
        sparse = _read(src / "labelsTr" / f"{case}.nii.gz")
        assert np.array_equal(a, b)
        assert np.array_equal(b[info["annotated"]], sparse[info["annotated"]])
        assert b.max() <= 5 and len(np.unique(b)) > 1
    assert not list(par.rglob(".predictions"))


# ------------------------------------------------------------------------------------------ trainers
def test_trainers_schedule_and_folds():
    import nnunet_ext.trainers as ours
    from nnunet_ext.core.schedules import SCHEDULES

    a, b = ours.nnUNetTrainerLabelPropA, ours.nnUNetTrainerLabelPropB
    assert a.num_folds == b.num_folds == 4 and a.recipe_epochs == 100 and b.recipe_epochs == 500
    assert ours.nnUNetTrainerLabelPropA_smoke.__mro__[1] is a
    assert SCHEDULES["smoke"]["num_epochs"] == 1
    with pytest.raises(UserError, match="4-fold"):
        a({}, "3d_fullres", 4, {})


# ------------------------------------------------------------------------------------------ the whole recipe
@pytest.mark.slow
def test_run_recipe_end_to_end_and_resume(phantom_workspace):
    """interpolate -> plan/preprocess -> train A (_smoke, 3d_tiny, fold 0) -> pseudo -> plan/preprocess -> train B,
    through `nnunet-ext labelprop run`; then a rerun skips everything and an interrupted training resumes."""
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    root, env = phantom_workspace.root, training_env(phantom_workspace.env)
    src = write_phantom_dataset(
        root / "raw", 560, kind="sparse", num_train=6, num_test=1, shape=(24, 48, 48), seed=560, every=4
    )
    state = root / "lp_state.json"
    cmd = [
        "nnunet-ext",
        "labelprop",
        "run",
        "560",
        "--out-id",
        "561",
        "-c",
        "3d_tiny",
        "-f",
        "0",
        "--device",
        "cpu",
    ]
    cmd += ["--trainer-a", "nnUNetTrainerLabelPropA_smoke", "--trainer-b", "nnUNetTrainerLabelPropB_smoke"]
    cmd += ["-np", "1", "--state", str(state), "--qc-cases", "2", "--disable-tta"]
    proc = run(cmd, env, timeout=1800)  # ~3 min on 2 idle cores; generous for loaded CI machines
    assert "finished. Final model" in proc.stdout
    data = json.loads(state.read_text())
    keys = [
        "interpolate:561",
        "preprocess:561",
        "train:561:nnUNetTrainerLabelPropA_smoke:0",
        "pseudo:562",
        "preprocess:562",
        "train:562:nnUNetTrainerLabelPropB_smoke:0",
    ]
    assert list(data["done"]) == keys
    interp = next((root / "raw").glob("Dataset561_*"))
    pseudo = next((root / "raw").glob("Dataset562_*"))
    assert "ignore" not in json.loads((pseudo / "dataset.json").read_text())["labels"]
    meta = json.loads((pseudo / "labelprop.json").read_text())
    assert meta["step"] == "pseudo" and meta["folds"] == ["0"]
    for case, info in meta["cases"].items():
        sparse = _read(src / "labelsTr" / f"{case}.nii.gz")
        lab = _read(pseudo / "labelsTr" / f"{case}.nii.gz")
        ann = info["annotated"]
        assert ann == sorted(set(np.flatnonzero((sparse != 6).any(axis=(1, 2))).tolist()))
        assert np.array_equal(lab[ann], sparse[ann])  # annotated slices kept exactly
        assert lab.max() <= 5 and lab.shape == sparse.shape
    assert (interp / "labelprop.json").is_file()
    # model A's dataset keeps the ignore label outside the annotated range: planned from a fingerprint whose
    # foreground statistics leave it out (nnunet_ext.planning.fingerprint)
    assert "ignore" in json.loads((interp / "dataset.json").read_text())["labels"]
    fingerprint = json.loads((root / "preprocessed" / interp.name / "dataset_fingerprint.json").read_text())
    assert fingerprint["nnunet_ext_ignore_label_excluded"] is True
    qc = root / "lp_state_qc"
    assert (
        len(list((qc / interp.name).glob("*.png"))) == 2 and len(list((qc / pseudo.name).glob("*.png"))) == 2
    )
    final = root / "results" / pseudo.name / "nnUNetTrainerLabelPropB_smoke__nnUNetPlans__3d_tiny" / "fold_0"
    assert (final / "checkpoint_final.pth").is_file()

    # rerun: every step is skipped
    proc = run(cmd, env)
    assert proc.stdout.count("done, skipped") == len(keys)
    # an interrupted last training: resumed with --c
    data["done"].pop(keys[-1])
    state.write_text(json.dumps(data))
    proc = run(cmd, env)
    assert "already holds checkpoint_final.pth" in proc.stdout
    (final / "checkpoint_final.pth").unlink()
    state.write_text(json.dumps(data))
    proc = run(cmd, env)
    assert "--c" in proc.stdout and keys[-1] in json.loads(state.read_text())["done"]
    assert (final / "checkpoint_final.pth").is_file()
    # other options than recorded: refused
    other = subprocess_run([*cmd, "--rounds", "2"], env)
    assert other.returncode == 1 and "other options" in other.stderr


def subprocess_run(cmd, env):
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / cmd[0])
    return subprocess.run(
        [exe, *cmd[1:]], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace"
    )


# ------------------------------------------------------------------------------------------ --plans-preset
def test_recipe_plans_preset_is_checked_before_any_step(nnunet_folders):
    from nnunet_ext.labelprop.run import RecipeOptions, _check_preset

    _check_preset(RecipeOptions("x", 1, configuration="3d_converge", plans_preset="converge"))
    _check_preset(RecipeOptions("x", 1, configuration="3d_fullres", plans_preset="converge"))
    with pytest.raises(UserError, match="unknown plans preset 'nope'; available: .*converge"):
        _check_preset(RecipeOptions("x", 1, configuration="3d_converge", plans_preset="nope"))
    with pytest.raises(
        UserError, match="-c 3d_tiny: the plans preset 'converge' adds 3d_converge; train one"
    ):
        _check_preset(RecipeOptions("x", 1, configuration="3d_tiny", plans_preset="converge"))
    # recorded in the state only when set: a state file written before the option existed still resumes
    assert "plans_preset" not in RecipeOptions("x", 1).recorded()
    assert RecipeOptions("x", 1, plans_preset="converge").recorded()["plans_preset"] == "converge"


def test_recipe_applies_the_plans_preset_after_planning_3d_fullres(nnunet_folders, monkeypatch):
    """The first dataset is planned and preprocessed as 3d_fullres (the data 3d_converge reuses), then the
    preset adds the configuration to train; a later round reuses those plans (move_plans)."""
    from nnunet_ext.labelprop import run as recipe

    raw, pre = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    (raw / "Dataset561_Interp").mkdir(parents=True)
    (raw / "Dataset561_Interp" / "dataset.json").write_text((DATA / "dataset.json").read_text())
    ran = []

    def fake_run(cmd, env, log, lock=None):
        ran.append([Path(cmd[0]).name, *cmd[1:]])
        if Path(cmd[0]).name == "nnUNetv2_plan_and_preprocess":
            (pre / "Dataset561_Interp").mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / "nnUNetPlans.json", pre / "Dataset561_Interp" / "nnUNetPlans.json")

    monkeypatch.setattr(recipe, "_run", fake_run)
    monkeypatch.setattr(
        "nnunet_ext.planning.fingerprint.exclude_ignore_from_fingerprint", lambda *a, **k: None
    )
    opts = recipe.RecipeOptions(
        "x", 561, configuration="3d_converge", plans_preset="converge", num_processes=1
    )
    recipe._preprocess(561, opts, log=lambda msg: None)
    planned = next(c for c in ran if c[0] == "nnUNetv2_plan_and_preprocess")
    assert planned[planned.index("-c") + 1] == "3d_fullres"
    plans = json.loads((pre / "Dataset561_Interp" / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_converge"]["patch_size"] == [16, 32, 32]
    assert plans["configurations"]["3d_converge"]["inherits_from"] == "3d_fullres"
