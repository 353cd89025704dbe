"""KiPA22: Kidney Parsing for renal cancer treatment (MICCAI 2022), CTA, 4 structures.

Source layout (the challenge's download, as we know it; the error messages quote it):

    SOURCE/train/image/<id>.nii.gz     training images
    SOURCE/train/label/<id>.nii.gz     their labels (0 background, 1 vein, 2 kidney, 3 artery, 4 tumour)
    SOURCE/open/image/<id>.nii.gz      optional: open test images (also accepted: test/image, val/image)
    SOURCE/open/label/<id>.nii.gz      optional: their labels (-> labelsTs)

Case ids are ``KiPA_<id>``; submissions use ``<id>.nii.gz`` again.
Metrics: Dice, Hausdorff distance (HD) and average Hausdorff distance (AVD) per structure, 12 scores ranked
by mean rank over the teams (a ranking needs the other teams: we report the 12 scores).
"""

from __future__ import annotations

from pathlib import Path

from nnunet_ext.challenges.base import Challenge, MetricRules, SourceCase, image_files, strip_suffix

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
        both_empty={"Dice": 1.0, "HD": 0.0, "AVD": 0.0},
        one_empty={"Dice": 0.0, "HD": "diagonal", "AVD": "diagonal"},
        notes=(
            "HD: maximum symmetric surface distance (mm); AVD: average Hausdorff distance = max of the two "
            "directed mean surface distances (Taha & Hanbury), both from MONAI surface distances",
            "empty masks: our convention (not in our references): both empty -> perfect; one empty -> Dice 0, "
            "distances = image diagonal (mm)",
            "the ranking (mean rank of 12 scores over teams) is not computed",
        ),
    )
    submission_format = (
        "<id>.nii.gz (the test image's name), uint8 labels 1 vein, 2 kidney, 3 artery, 4 tumour"
    )

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
