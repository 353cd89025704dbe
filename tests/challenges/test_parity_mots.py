"""MOTS evaluation and post-processing at parity with DoDNet's own code (jianpengz/DoDNet).

The fixture ``tests/data/parity/mots_dodnet_official.json`` holds the numbers of the official computation on
the hand-made volumes built by :func:`build_case` / :func:`build_pp_case`: DoDNet's ``dataset/re_spacing.py``
resampling (scikit-image ``resize`` as it calls it), its ``a_DynConv/postp.py`` class extraction, Dice and
``compute_HD95`` (MedPy 0.5.2 ``hd95``, loli/medpy), and postp.py's connected-component rules (scikit-image
``label`` with ``neighbors=4``, i.e. connectivity 1, as scikit-image <= 0.17 read it). The fixture records the
repositories and commits; the official code is not a test dependency.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
from support.mots_cases import build_pp_case, paint, pp_cases  # noqa: F401
from support.paths import DATA

from nnunet_ext.challenges import get_challenge
from nnunet_ext.challenges.evaluate import evaluate_folders
from nnunet_ext.challenges.mots import dodnet_grid, dodnet_postprocess

FIXTURE = DATA / "parity" / "mots_dodnet_official.json"

# ------------------------------------------------------------------------------ hand-made volumes (mm objects)
ORGAN = ("sphere", (15.0, 12.0, 12.0), 7.0)
TUMOUR = ("sphere", (15.0, 12.0, 14.0), 2.5)


def _shift(obj, dz=0.0, dy=0.0, dx=0.0, grow=0.0):
    kind, (z, y, x), size = obj
    if kind == "sphere":
        return kind, (z + dz, y + dy, x + dx), size + grow
    return kind, (z + dz, y + dy, x + dx), tuple(s + grow for s in size)


def _organ_tumour(organ=ORGAN, tumour=TUMOUR, organ_value=1, tumour_value=2):
    out = []
    if organ is not None:
        out.append((*organ, organ_value))
    if tumour is not None:
        out.append((*tumour, tumour_value))
    return out


#: name -> (task, spacing (z, y, x), shape, reference objects, prediction objects)
def metric_cases() -> dict:
    aniso, grid, fine, thick = (2.5, 0.8, 0.8), (1.5, 0.8, 0.8), (0.75, 0.7, 0.7), (5.0, 1.0, 1.0)
    shape_of = {aniso: (12, 30, 30), grid: (20, 30, 30), fine: (40, 34, 34), thick: (6, 24, 24)}
    shifted = _organ_tumour(_shift(ORGAN, dx=2.0), _shift(TUMOUR, dx=2.0))
    cases = {}
    for name, sp in (("aniso", aniso), ("grid", grid), ("fine", fine), ("thick", thick)):
        cases[f"liver_{name}_shifted"] = ("liver", sp, shape_of[sp], _organ_tumour(), shifted)
    cases["liver_aniso_eroded"] = (
        "liver",
        aniso,
        shape_of[aniso],
        _organ_tumour(),
        _organ_tumour(_shift(ORGAN, grow=-1.6), _shift(TUMOUR, grow=-1.0)),
    )
    cases["pancreas_missed_tumour"] = (
        "pancreas",
        aniso,
        shape_of[aniso],
        _organ_tumour(),
        _organ_tumour(tumour=None),
    )
    cases["pancreas_false_tumour"] = ("pancreas", aniso, shape_of[aniso], _organ_tumour(tumour=None), shifted)
    cases["liver_no_tumour"] = (
        "liver",
        aniso,
        shape_of[aniso],
        _organ_tumour(tumour=None),
        _organ_tumour(_shift(ORGAN, dy=0.8), None),
    )
    tiny = ("sphere", (15.0, 12.0, 14.0), 0.45)
    cases["liver_fine_tiny_tumour"] = ("liver", fine, shape_of[fine], _organ_tumour(tumour=tiny), shifted)
    kidneys = [
        ("sphere", (15.0, 12.0, 7.0), 4.0, 1),
        ("sphere", (15.0, 12.0, 17.0), 4.0, 1),
        ("sphere", (15.0, 12.0, 18.0), 1.8, 2),
    ]
    kid_pred = [(k, _shift((k, c, s), dy=1.6)[1], s, v) for k, c, s, v in kidneys]
    cases["kidney_two_shifted"] = ("kidney", (2.5, 0.78, 0.78), (12, 31, 31), kidneys, kid_pred)
    vessel = [("box", (15.0, 12.0, 12.0), (10.0, 1.2, 1.2), 1), ("sphere", (15.0, 12.0, 16.0), 2.5, 2)]
    vessel_pred = [("box", (15.0, 12.8, 12.0), (9.0, 1.2, 1.2), 1), ("sphere", (15.0, 12.0, 15.2), 2.2, 2)]
    cases["hepaticvessel_tube"] = ("hepaticvessel", aniso, shape_of[aniso], vessel, vessel_pred)
    colon = [(*TUMOUR[:2], 4.0, 1)]
    cases["colon_shifted"] = ("colon", aniso, shape_of[aniso], colon, [(*_shift(TUMOUR, dz=2.5)[:2], 4.0, 1)])
    cases["lung_empty_prediction"] = ("lung", aniso, shape_of[aniso], colon, [])
    cases["spleen_eroded"] = (
        "spleen",
        (3.0, 0.9, 0.9),
        (10, 27, 27),
        [(*ORGAN, 1)],
        [(*_shift(ORGAN, grow=-1.8), 1)],
    )
    return cases


def build_case(name: str):
    """(task, spacing, reference, prediction) of a metric case, in the task's source label values."""
    task, spacing, shape, gt_objects, pred_objects = metric_cases()[name]
    return task, spacing, paint(shape, spacing, gt_objects), paint(shape, spacing, pred_objects)


#: post-processing cases on DoDNet's grid: name -> (task, shape, objects) (prediction label map)


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(mask, bool).ravel()).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def official() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_names_its_sources(official):
    src = official["source"]
    assert src["dodnet"]["repository"] == "jianpengz/DoDNet" and len(src["dodnet"]["commit"]) == 40
    assert src["medpy"]["repository"] == "loli/medpy" and len(src["medpy"]["commit"]) == 40
    assert set(official["metrics"]) == set(metric_cases()) and set(official["postprocessing"]) == set(
        pp_cases()
    )


@pytest.mark.parametrize("name", sorted(metric_cases()))
def test_dice_and_hd95_equal_dodnets_on_its_grid(official, name, tmp_path):
    task, spacing, gt, pred = build_case(name)
    expected = official["metrics"][name]
    for path, array in (("gt", gt), ("pred", pred)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(spacing)))
        (tmp_path / path).mkdir()
        sitk.WriteImage(image, str(tmp_path / path / f"{name}.nii.gz"))
    got = evaluate_folders(f"mots-{task}", tmp_path / "pred", tmp_path / "gt")["cases"][name]
    assert set(got) == set(expected)
    for cls, values in expected.items():
        assert got[cls]["Dice"] == pytest.approx(values["Dice"], abs=1e-4), (cls, "Dice")
        assert got[cls]["HD95_pooled"] == pytest.approx(values["HD95"], abs=1e-4), (cls, "HD95")


def test_the_same_boundary_error_scores_alike_at_every_native_spacing(official, tmp_path):
    """DoDNet's grid makes HD95 (voxels) comparable across native spacings (issue: 2.00 / 3.16 / 6.71 before),
    in DoDNet's numbers and in ours (a 2 mm shift scored on the native grid would differ by spacing again)."""
    names = [f"liver_{s}_shifted" for s in ("aniso", "grid", "fine", "thick")]
    for name in names:
        task, spacing, gt, pred = build_case(name)
        for folder, array in (("gt", gt), ("pred", pred)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(reversed(spacing)))
            (tmp_path / folder).mkdir(exist_ok=True)
            sitk.WriteImage(image, str(tmp_path / folder / f"{name}.nii.gz"))
    ours = evaluate_folders("mots-liver", tmp_path / "pred", tmp_path / "gt")["cases"]
    for hd in (
        [official["metrics"][n]["liver_organ"]["HD95"] for n in names],
        [ours[n]["liver_organ"]["HD95_pooled"] for n in names],
    ):
        assert max(hd) - min(hd) < 1.0, hd


def test_merged_dataset_scores_like_the_source(official, tmp_path):
    """Unified labels are put back in the task's source values before resampling (the anti-aliasing sees the
    values DoDNet's files hold)."""
    from nnunet_ext.multitask.merge import MOTS_PRESET

    unified = get_challenge("mots").labels
    for name in ("kidney_two_shifted", "colon_shifted"):
        task, spacing, gt, pred = build_case(name)
        lut = np.zeros(3, np.uint8)
        for value, label in MOTS_PRESET["tasks"][task]["labels"].items():
            lut[int(value)] = unified[label]
        for folder, array in (("gt", gt), ("pred", pred)):
            image = sitk.GetImageFromArray(lut[array])
            image.SetSpacing(tuple(reversed(spacing)))
            (tmp_path / folder).mkdir(exist_ok=True)
            sitk.WriteImage(image, str(tmp_path / folder / f"{task}_{name}.nii.gz"))
    got = evaluate_folders("mots", tmp_path / "pred", tmp_path / "gt")["cases"]
    for name in ("kidney_two_shifted", "colon_shifted"):
        task = name.split("_")[0]
        for cls, values in official["metrics"][name].items():
            assert got[f"{task}_{name}"][cls]["HD95_pooled"] == pytest.approx(values["HD95"], abs=1e-4)
            assert got[f"{task}_{name}"][cls]["Dice"] == pytest.approx(values["Dice"], abs=1e-4)


def test_dodnet_grid_size_and_values():
    lab = np.zeros((12, 30, 30), np.uint8)
    lab[4:8, 10:20, 10:20] = 2
    out = dodnet_grid(lab, (2.5, 0.8, 0.8))
    assert out.shape == (20, 30, 30) and out.dtype == np.uint8  # int(12 * 2.5 / 1.5) = 20
    assert set(np.unique(out)) == {0, 2}
    from nnunet_ext.core.errors import UserError

    with pytest.raises(UserError, match="no voxel on DoDNet's"):
        dodnet_grid(np.zeros((1, 4, 4), np.uint8), (1.0, 0.8, 0.8))


@pytest.mark.parametrize("name", sorted(pp_cases()))
def test_postprocessing_equals_dodnets_postp(official, name):
    task, seg = build_pp_case(name)
    challenge = get_challenge(f"mots-{task}")
    out = challenge.postprocess(seg)  # on DoDNet's grid: 50 voxels
    expected = official["postprocessing"][name]
    for cls in challenge.eval_classes(name):
        mask = np.isin(out, cls.labels)
        assert int(mask.sum()) == expected[cls.name]["voxels"], cls.name
        assert mask_digest(mask) == expected[cls.name]["sha1"], cls.name
    # the same rules through the voxel volume: 0.96 mm^3 is DoDNet's voxel
    np.testing.assert_array_equal(
        dodnet_postprocess(seg, task, *_organ_tumour_values(challenge), voxel_volume=0.96), out
    )


def _organ_tumour_values(challenge):
    return (
        challenge.organ[0] if challenge.organ else None,
        challenge.tumour[0] if challenge.tumour else None,
    )


def test_small_tumour_threshold_scales_with_the_voxel_volume():
    seg = np.zeros((10, 20, 20), np.uint8)
    seg[1:9, 1:19, 1:19] = 1
    seg[2:6, 2:10, 2:10] = 2  # 256 voxels
    seg[7, 12:15, 12:15] = 2  # 9 voxels
    # at 1 x 1 x 1 mm (1 mm^3 voxels) the threshold is 48 voxels: the 9-voxel piece goes
    out = dodnet_postprocess(seg, "liver", 1, 2, voxel_volume=1.0)
    assert (out == 2).sum() == 256 and out[7, 13, 13] == 1
    # at 0.1 mm^3 voxels it is 480: both pieces go (there are two), tumour voxels become liver
    out = dodnet_postprocess(seg, "liver", 1, 2, voxel_volume=0.1)
    assert (out == 2).sum() == 0 and (out == 1).sum() == (seg > 0).sum()
