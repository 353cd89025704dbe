"""Boundary targets (nnunet_ext.banet.boundary_targets) against hand-made volumes and nnU-Net's own DS downsampling."""

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from scipy.ndimage import minimum_filter

from nnunet_ext.banet.boundary_targets import (
    boundary_target,
    boundary_targets_for_deep_supervision,
    downsample_for_deep_supervision,
    downsample_like_nnunet,
)


def _batch(arr: np.ndarray, dtype=torch.int16) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(dtype)


def _reference(label: np.ndarray, ignore_label=None) -> np.ndarray:
    """Brute-force definition: min over the 3^n neighbourhood with replicated borders < own label."""
    out = (minimum_filter(label, size=3, mode="nearest") < label).astype(label.dtype)
    if ignore_label is not None:
        out[label == ignore_label] = ignore_label
    return out


def test_two_classes_touching_one_voxel_on_higher_side():
    lab = np.zeros((8, 6, 6), np.int16)
    lab[2:5] = 1  # slab of 1 from x=2..4
    lab[5:] = 2  # slab of 2 from x=5..7, touching class 1
    b = boundary_target(_batch(lab))[0, 0].numpy()
    expected = np.zeros_like(lab)
    expected[2] = 1  # class 1 next to background (x=1)
    expected[5] = 1  # class 2 next to class 1 (x=4); the class-1 side (x=4) is NOT boundary
    np.testing.assert_array_equal(b, expected)
    # replication padding: the slabs touch the y/z borders and x=7 without creating boundary there
    assert b[:, 0].sum() == b[:, 1].sum()


def test_object_touching_patch_border_has_no_border_boundary():
    lab = np.zeros((6, 6, 6), np.int16)
    lab[:3, :3, :3] = 1  # cube in the corner
    b = boundary_target(_batch(lab))[0, 0].numpy()
    x, y, z = np.indices(lab.shape)
    expected = ((lab == 1) & (np.maximum(np.maximum(x, y), z) == 2)).astype(np.int16)
    np.testing.assert_array_equal(b, expected)
    assert b[0, 0, 0] == 0 and b[0, 1, 1] == 0  # faces on the volume border are not boundary


def test_full_26_neighbourhood_and_binarised():
    lab = np.full((7, 7, 7), 3, np.int16)
    lab[3, 3, 3] = 0  # a single lower voxel
    b = boundary_target(_batch(lab))[0, 0].numpy()
    expected = np.zeros_like(lab)
    expected[2:5, 2:5, 2:5] = 1  # every 26-neighbour (diagonals too), value 1 not 3
    expected[3, 3, 3] = 0
    np.testing.assert_array_equal(b, expected)


def test_ignore_label_kept_and_does_not_create_boundary():
    lab = np.zeros((6, 6, 6), np.int16)
    lab[1:5, 1:5, 1:5] = 1
    lab[:, :, 4:] = 4  # ignore label (highest) over the top slices
    b = boundary_target(_batch(lab), ignore_label=4)[0, 0].numpy()
    np.testing.assert_array_equal(b[:, :, 4:], 4)
    # class 1 at z=3 borders ignore voxels only from above: boundary only where background is near
    assert b[2, 2, 3] == 0
    assert b[1, 2, 3] == 1
    np.testing.assert_array_equal(b, _reference(lab, 4))


def test_2d_uses_3x3_neighbourhood():
    lab = np.zeros((6, 6), np.int16)
    lab[2:, 2:] = 2
    lab[4:, 4:] = 1  # lower class inside: class 2 around it becomes boundary (diagonal too)
    b = boundary_target(_batch(lab))[0, 0].numpy()
    expected = np.zeros_like(lab)
    expected[2, 2:] = 1
    expected[2:, 2] = 1
    expected[3, 3:] = 1
    expected[3:, 3] = 1
    np.testing.assert_array_equal(b, expected)


@pytest.mark.parametrize("shape", [(9, 11, 7), (13, 10)])
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.float32, torch.int64])
def test_matches_reference_on_random_labels(shape, dtype):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, size=(3, 1, *shape)).astype(np.int16)
    b = boundary_target(torch.from_numpy(lab).to(dtype), ignore_label=3)
    assert b.dtype == dtype and b.shape == lab.shape
    for i in range(lab.shape[0]):
        np.testing.assert_array_equal(b[i, 0].numpy().astype(np.int16), _reference(lab[i, 0], 3))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        boundary_target(torch.zeros(2, 2, 4, 4, 4))
    with pytest.raises(ValueError):
        boundary_target(torch.zeros(1, 1, 4, 4, 4), ignore_label=1)


def _nnunet_ds_scales(pool_op_kernel_sizes):
    # nnUNetTrainer._get_deep_supervision_scales
    return list(list(i) for i in 1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0))[:-1]


@pytest.mark.parametrize(
    "shape,pools",
    [
        ((21, 19, 17), [[1, 1, 1], [2, 2, 2], [2, 2, 1], [2, 2, 2]]),
        ((16, 16, 16), [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
        ((23, 18), [[1, 1], [2, 2], [2, 2], [2, 2]]),
    ],
)
def test_downsampling_matches_nnunet_transform(shape, pools):
    rng = np.random.default_rng(1)
    lab = torch.from_numpy(rng.integers(0, 5, size=(2, 1, *shape)).astype(np.int16))
    scales = _nnunet_ds_scales(pools)
    transform = DownsampleSegForDSTransform(ds_scales=scales)
    ours_seg = downsample_for_deep_supervision(lab, scales)
    ours_bnd = boundary_targets_for_deep_supervision(lab, scales, ignore_label=4)
    full_bnd = boundary_target(lab, ignore_label=4)
    assert len(ours_seg) == len(ours_bnd) == len(scales)
    for i in range(lab.shape[0]):
        # what nnU-Net's data pipeline gives per sample: the segmentation targets ...
        ref_seg = transform(segmentation=lab[i].clone())["segmentation"]
        # ... and the same transform applied to the full-resolution boundary map
        ref_bnd = transform(segmentation=full_bnd[i].clone())["segmentation"]
        for s in range(len(scales)):
            assert ours_seg[s][i].dtype == ref_seg[s].dtype
            torch.testing.assert_close(ours_seg[s][i], ref_seg[s], rtol=0, atol=0)
            torch.testing.assert_close(ours_bnd[s][i], ref_bnd[s], rtol=0, atol=0)
    assert ours_bnd[0] is not None and torch.equal(ours_bnd[0], full_bnd)


def test_downsampling_without_deep_supervision_and_scalar_scale():
    lab = torch.randint(0, 3, (1, 1, 8, 8, 8), dtype=torch.int16)
    assert downsample_for_deep_supervision(lab, None) is lab
    assert downsample_like_nnunet(lab, 0.5).shape == (1, 1, 4, 4, 4)
    assert downsample_like_nnunet(lab, [1, 1, 1]) is lab
    with pytest.raises(ValueError):
        downsample_like_nnunet(lab, [0.5, 0.5])
