"""KiPA22: Kidney Parsing for renal cancer treatment (MICCAI 2022), CTA, 4 structures.

Source layout (the challenge's download, as we know it; the error messages quote it):

    SOURCE/train/image/<id>.nii.gz     training images
    SOURCE/train/label/<id>.nii.gz     their labels (0 background, 1 vein, 2 kidney, 3 artery, 4 tumour)
    SOURCE/open/image/<id>.nii.gz      optional: open test images (also accepted: test/image, val/image)
    SOURCE/open/label/<id>.nii.gz      optional: their labels (-> labelsTs)

Case ids are ``KiPA_<id>``; submissions use ``<id>.nii.gz`` again.
Metrics: Dice, Hausdorff distance (HD) and average Hausdorff distance (AVD) per structure, 12 scores ranked
by mean rank over the teams (a ranking needs the other teams: we report the 12 scores). Scored as the
challenge's official ``EVALUATION/evaluation.py`` (github.com/KiPA2022/kipa22, commit fcad1ed) does:

* Dice on the native grid; a structure absent from both -> NaN (0/0, left out of the means);
* HD and AVD after nearest-neighbour resampling of both label maps to 1 mm (output size
  ``round(size * spacing)`` per axis, the reference's grid), on SimpleITK ``SimpleContourExtractor`` contours
  (a voxel of the structure with a background voxel among its 26 neighbours), with SimpleITK's
  ``HausdorffDistanceImageFilter``: HD is the maximum, AVD the MEAN of the two directed mean distances;
* the official code gives the prediction the reference's x spacing on all three axes before resampling:
  the same as its own spacing for isotropic images, a misalignment for anisotropic ones. We resample the
  prediction with its own spacing (which must equal the reference's): identical results on isotropic
  images, correct ones on anisotropic images, where the official code's differ;
* a structure the prediction misses: the image border (the six faces of the 1 mm grid) is its predicted
  surface. The official code crashes on a structure the reference lacks; ours scores a predicted
  structure against the image border as its reference surface (Dice 0), and a structure absent from both
  as NaN (left out of the means).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nnunet_ext.challenges.base import (
    Challenge,
    LabelVolume,
    MetricRules,
    SourceCase,
    image_files,
    strip_suffix,
)

TEST_FOLDERS = ("open", "test", "val", "validation")


class KiPA22(Challenge):
    name = "kipa22"
    title = "KiPA22"
    url = "https://kipa22.grand-challenge.org/"
    dataset_name = "KiPA22"
    labels = {"background": 0, "vein": 1, "kidney": 2, "artery": 3, "tumour": 4}
    channel_names = {"0": "CT"}
    prefix = "KiPA_"
    layout = (
        "  SOURCE/train/image/<id>.nii.gz   and   SOURCE/train/label/<id>.nii.gz (same file names)\n"
        "  optional test images: SOURCE/open/image/<id>.nii.gz (or test/, val/), labels in .../label/"
    )
    rules = MetricRules(
        metrics=("Dice", "HD", "AVD"),
        both_empty={"Dice": math.nan, "HD": math.nan, "AVD": math.nan},
        one_empty={"Dice": 0.0},  # HD / AVD: the image border stands in for the missing surface
        notes=(
            "as the official EVALUATION/evaluation.py (KiPA2022/kipa22 fcad1ed): Dice on the native grid; HD and "
            "AVD (mean of the two directed mean distances) after nearest resampling to 1 mm, on SimpleITK "
            "SimpleContourExtractor contours, with SimpleITK's HausdorffDistanceImageFilter",
            "a structure the prediction misses is scored against the image border (official); one the reference "
            "lacks: the border as its reference surface (ours: the official code crashes); absent from both: NaN",
            "deviation: the official code gives the prediction the reference's x spacing on every axis before "
            "resampling; we keep the prediction's own spacing (the same on isotropic images; on anisotropic "
            "ones the official HD/AVD are misaligned along z and ours are not)",
            "the ranking (mean rank of 12 scores over teams) is not computed",
        ),
        assumed=(
            "a structure the reference lacks (the official code crashes): Dice 0, HD/AVD against the image border "
            "as the reference surface; absent from both: NaN",
        ),
    )
    submission_format = (
        "<id>.nii.gz (the test image's name), uint8 labels 1 vein, 2 kidney, 3 artery, 4 tumour"
    )

    def score_case(self, pred, gt, case_id, metrics, tolerance=None):
        official = [m for m in metrics if m in ("HD", "AVD")]
        rest = tuple(m for m in metrics if m not in official)
        result = super().score_case(pred, gt, case_id, rest, tolerance) if rest else {}
        if official:
            pred_1mm, gt_1mm = resample_like_official(pred, gt)
            for cls in self.eval_classes(case_id):
                values = official_hd_avd(np.isin(pred_1mm, cls.labels), np.isin(gt_1mm, cls.labels))
                result.setdefault(cls.name, {}).update({m: values[m] for m in official})
        return {cls: {m: values[m] for m in metrics} for cls, values in result.items()}

    def find_cases(self, source: Path, **options):
        cases, skipped = [], []
        train = source / "train"
        for split, folder in [("Tr", train)] + [("Ts", source / t) for t in TEST_FOLDERS]:
            images = image_files(folder / "image")
            labels = {strip_suffix(p.name): p for p in image_files(folder / "label")}
            for image in images:
                stem = strip_suffix(image.name)
                label = labels.pop(stem, None)
                if split == "Tr" and label is None:
                    skipped.append((f"{folder.name}/image/{image.name}", "no label in train/label"))
                    continue
                cases.append(SourceCase(f"{self.prefix}{stem}", [image], label, split, stem))
            skipped += [(f"{folder.name}/label/{p.name}", "no image with this name") for p in labels.values()]
        return cases, skipped

    def submission_name(self, case_id: str, meta: dict) -> str:
        original = meta.get("original") or case_id.removeprefix(self.prefix)
        return f"{original}.nii.gz"


# ------------------------------------------------------------------------------ the official HD / AVD
def _as_sitk(volume: LabelVolume):
    import SimpleITK as sitk

    if volume.reader == "sitk":
        return volume.reference
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(tuple(float(s) for s in reversed(volume.spacing)))
    return image


def resample_like_official(pred: LabelVolume, gt: LabelVolume) -> tuple[np.ndarray, np.ndarray]:
    """Both label maps on the official 1 mm grid ((z, y, x) arrays): size ``round(size * spacing)`` of the
    reference, nearest neighbour, each image with its own geometry. (The official code gives the prediction the
    reference's x spacing on every axis; the same for KiPA22's isotropic images, a misalignment along the
    other axes of anisotropic ones, which we do not copy.)"""
    import SimpleITK as sitk

    reference, prediction = _as_sitk(gt), _as_sitk(pred)
    size = [int(round(n * s)) for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    arrays = []
    for image in (prediction, reference):
        resampler = sitk.ResampleImageFilter()
        resampler.SetReferenceImage(image)
        resampler.SetSize(size)
        resampler.SetOutputSpacing([1.0, 1.0, 1.0])
        resampler.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        arrays.append(sitk.GetArrayFromImage(resampler.Execute(image)))
    return arrays[0], arrays[1]


def _contour(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.SimpleContourExtractorImageFilter().Execute(image)).astype(bool)


def _border(shape) -> np.ndarray:
    border = np.ones(shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    return border


def official_hd_avd(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """HD and AVD (mm) of two boolean masks on the 1 mm grid, as the official evaluation computes them: on their
    contours, with the image border standing in for a missing contour (the prediction's, as the official
    code; the reference's, our choice where the official code crashes); NaN when both are missing."""
    import SimpleITK as sitk

    p, g = _contour(pred), _contour(gt)
    if not p.any() and not g.any():
        return {"HD": math.nan, "AVD": math.nan}
    if not p.any():
        p = _border(p.shape)
    elif not g.any():
        g = _border(g.shape)
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(sitk.GetImageFromArray(p.astype(np.uint8)), sitk.GetImageFromArray(g.astype(np.uint8)))
    return {"HD": hausdorff.GetHausdorffDistance(), "AVD": hausdorff.GetAverageHausdorffDistance()}
