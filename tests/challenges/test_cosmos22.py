"""COSMOS22 converter: CASCADE files read as the 1st-place entry (ShishuaiHu/Label-Propagation convertor/convert.py)
did: <case>L/R.QVJ (side, status with the bifurcation offset, IQ > 1), the QVS it names, points on a 512 grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from support.challenge_fakes import COSMOS_SHAPE, fake_cosmos, outline, qvj, qvs, read, tree_hash

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.base import convert
from nnunet_ext.challenges.cosmos22 import _side_of, contour_mask, nearest_status, read_qvj
from nnunet_ext.core.errors import UserError


def test_sparse_slices_with_ignore_label_consumed_by_labelprop(tmp_path):
    src = fake_cosmos(tmp_path)
    before = tree_hash(src)
    raw = tmp_path / "raw"
    r = convert(get_challenge("cosmos22"), src, 40, out=raw, progress=False)
    assert r.converted == {"Tr": ["c01_L", "c01_R", "c02_L", "c02_R"], "Ts": ["t01_L", "t01_R"]}
    dj = json.loads((r.folder / "dataset.json").read_text())
    assert dj["labels"] == {
        "background": 0, "lumen": 1, "normal_wall": 2, "atherosclerotic_wall": 3, "ignore": 4,
    }  # fmt: skip
    assert dj["channel_names"] == {"0": "MRI"}
    meta = dj["nnunet_ext_challenge"]["cases"]
    assert meta["c01_L"]["x_range"] == [16, 32] and meta["c01_L"]["annotated_slices"] == [1, 3]
    assert meta["c01_R"]["x_range"] == [0, 16] and meta["c01_R"]["annotated_slices"] == [1, 4]
    assert meta["t01_L"]["x_range"] == [16, 32] and meta["t01_R"]["x_range"] == [0, 16]

    left = read(r.folder / "labelsTr" / "c01_L.nii.gz")
    assert left.shape == (6, 16, 16)
    assert set(np.unique(left[[0, 2, 4, 5]])) == {4}  # unannotated slices: ignore
    z1 = left[1]  # points on the 512 grid scaled to 32 x 16 pixels: the 3x3 lumen, the 7x7 outer wall
    assert (z1 == 1).sum() == 9 and (z1 == 2).sum() == 40 and (z1 == 0).sum() == 256 - 49
    assert z1[8, 24 - 16] == 1 and z1[5, 24 - 16] == 2  # lumen centre, wall
    # slice 3 = Location Index 1 + bifurcation 2, AHAStatus 4 > 1: atherosclerotic
    assert (left[3] == 3).sum() == 40 and (left[3] == 2).sum() == 0
    right = read(r.folder / "labelsTr" / "c01_R.nii.gz")
    assert sorted(np.flatnonzero((right != 4).all(axis=(1, 2)))) == [1, 4]
    # no bifurcation: slice = Index - 1; Index 4 (slice 3) has IQ 1 and is not a status; slice 4: normal
    assert right[4, 9, 7] == 1 and (right[4] == 2).sum() == 40 and (right[4] == 3).sum() == 0
    image = sitk.ReadImage(str(r.folder / "imagesTr" / "c01_L_0000.nii.gz"))
    assert image.GetSize() == (16, 16, 6) and np.allclose(image.GetSpacing(), (0.5, 0.5, 2.0))
    assert np.allclose(image.GetOrigin(), (8.0, 0.0, 0.0))  # the left half keeps its physical position
    assert tree_hash(src) == before

    # one step of label propagation works on the converted dataset
    from nnunet_ext.labelprop.propagate import interpolate_dataset

    out = interpolate_dataset(r.folder, 41, "nearest", out=raw, progress=False)
    filled = read(out / "labelsTr" / "c01_L.nii.gz")
    np.testing.assert_array_equal(filled[2], left[1])  # halfway between slices 1 and 3: the lower one
    np.testing.assert_array_equal(filled[[1, 3]], left[[1, 3]])

    # one side without its QVJ: that half is reported, not converted
    (src / "c02" / "c02R.QVJ").unlink()
    one = convert(get_challenge("cosmos22"), src, 44, out=raw, progress=False)
    assert one.converted["Tr"] == ["c01_L", "c01_R", "c02_L"]
    assert dict(one.skipped) == {"c02_R": "no c02R.QVJ for this side: half not converted"}

    # whole volumes on request
    whole = convert(get_challenge("cosmos22"), src, 42, out=raw, progress=False, no_split_sides=True)
    lab = read(whole.folder / "labelsTr" / "c01.nii.gz")
    assert lab.shape == COSMOS_SHAPE and sorted(np.flatnonzero((lab != 4).all(axis=(1, 2)))) == [1, 3, 4]


def test_status_from_the_qvj(tmp_path):
    path = tmp_path / "10L.QVJ"
    path.write_text(qvj("a.QVS", {-2: (2, 1), 0: (3, 2), 3: (1, 5), 4: (2, 1.0)}, bifurcation=10))
    project = read_qvj(path)
    assert project == {"qvs": "a.QVS", "bifurcation": 10, "status": {8: False, 10: True, 14: False}}
    status = project["status"]
    assert nearest_status(10, status) is True and nearest_status(9, status) is False  # tie: the first listed
    assert nearest_status(12, status) is True and nearest_status(13, status) is False
    assert (
        nearest_status(7, status) is None and nearest_status(15, status) is None
    )  # outside the status range
    assert (
        _side_of(path) == "L"
        and _side_of(tmp_path / "10r.qvj") == "R"
        and _side_of(tmp_path / "10.QVJ") is None
    )
    path.write_text("<QVAS_Project><Location_Property/></QVAS_Project>")
    with pytest.raises(ValueError, match="no QVAS_Loaded_Series_List/QVASSeriesFileName"):
        read_qvj(path)


def test_slice_without_status_outside_the_status_range_is_left_unannotated(tmp_path):
    src = fake_cosmos(tmp_path)
    # status only for slice 1 (Index -1 + bifurcation 2): slice 3 has contours but no status in range
    (src / "c01" / "c01L.QVJ").write_text(qvj("E1S101_L.QVS", {-1: (2, 1)}, bifurcation=2))
    r = convert(get_challenge("cosmos22"), src, 46, out=tmp_path / "raw", progress=False)
    meta = json.loads((r.folder / "dataset.json").read_text())["nnunet_ext_challenge"]["cases"]["c01_L"]
    assert meta["annotated_slices"] == [1] and meta["slices_without_status"] == [3]
    assert set(np.unique(read(r.folder / "labelsTr" / "c01_L.nii.gz")[3])) == {4}


def test_contour_mask_fills_the_entrys_point_outline_and_closes_sparse_contours():
    from scipy.ndimage import binary_fill_holes

    dense = np.asarray(outline(10, 8, 4), float) + 0.3  # rounded back onto the outline
    entry = np.zeros((16, 20), bool)  # convert.py: rounded points set, holes filled
    for x, y in dense:
        entry[round(y), round(x)] = True
    np.testing.assert_array_equal(contour_mask(dense, (16, 20)), binary_fill_holes(entry))
    corners = np.asarray([(6, 4), (14, 4), (14, 12), (6, 12)], float)  # only the corners: segments drawn
    assert contour_mask(corners, (16, 20)).sum() == 81


def test_refuses_bad_cases_listing_every_problem(tmp_path):
    src = fake_cosmos(tmp_path)
    (src / "c02" / "E1S101_L.QVS").write_text(qvs({2: (40, 8)}))  # beyond the 32 px of the slice
    (src / "c01" / "c01R.QVJ").write_text("<QVAS_Project><QVAS_Loaded")
    before = tree_hash(src)
    with pytest.raises(UserError) as err:
        convert(get_challenge("cosmos22"), src, 43, out=tmp_path / "raw", progress=False)
    text = str(err.value)
    assert "c02: side L slice 2: contour points outside the 32x16 slice" in text
    assert "c01: c01R.QVJ is not valid XML" in text
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").glob("Dataset043_*"))
    assert tree_hash(src) == before

    src2 = fake_cosmos(tmp_path / "b")
    (src2 / "c01" / "E1S101_R.QVS").unlink()
    (src2 / "c02" / "E1S101_L.QVS").write_text(qvs({1: (7, 8)}))  # the left carotid in the right half
    with pytest.raises(UserError) as err:
        convert(get_challenge("cosmos22"), src2, 47, out=tmp_path / "raw", progress=False)
    text = str(err.value)
    assert "c01R.QVJ names the contour file E1S101_R.QVS, which is not in the case folder" in text
    assert "side L: contours outside its half of the image (x >= 16" in text
