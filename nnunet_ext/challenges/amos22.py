"""AMOS22: Abdominal Multi-Organ Segmentation (MICCAI 2022), 15 organs, CT (task 1) and CT + MRI (task 2).

Source layout (the official release, https://zenodo.org/record/7262581; as nnU-Net's own
Dataset218/219 converters read it):

    SOURCE/imagesTr/amos_XXXX.nii.gz, SOURCE/labelsTr/amos_XXXX.nii.gz   training
    SOURCE/imagesVa/amos_XXXX.nii.gz, SOURCE/labelsVa/amos_XXXX.nii.gz   validation (optional)
    SOURCE/imagesTs/amos_XXXX.nii.gz                                     test images (optional)
    SOURCE/dataset.json                                                  optional; its "labels" are checked

Case numbers up to 500 are CT, above 500 MRI. Task 1 (``amos22-task1``) keeps the CT cases only (MRI cases are
reported as skipped), task 2 (``amos22-task2``) keeps all, ``amos22-mri`` the MRI cases only (for an MR-only
model, as BA-Net's MRI entry ensembled). As nnU-Net does, validation cases become training
cases (nnU-Net's 5-fold cross-validation replaces the fixed split). Some AMOS files have direction cosines
SimpleITK refuses, so the dataset uses nnU-Net's ``NibabelIOWithReorient`` (as nnU-Net's converter).
Metrics: Dice and normalised surface Dice (NSD) per organ.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nnunet_ext.challenges.base import Challenge, MetricRules, SourceCase, image_files, strip_suffix
from nnunet_ext.core.errors import UserError

ORGANS = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
    "prostate/uterus",
)  # fmt: skip
MRI_FROM = 501  # amos_0501 and above are MRI


class AMOS22(Challenge):
    name = "amos22-task1"
    title = "AMOS22 task 1 (CT)"
    url = "https://amos22.grand-challenge.org/"
    dataset_name = "AMOS22task1"
    labels = {"background": 0, **{organ: i + 1 for i, organ in enumerate(ORGANS)}}
    channel_names = {"0": "CT"}
    reader_writer = "NibabelIOWithReorient"
    modalities = ("CT",)
    layout = (
        "  SOURCE/imagesTr/amos_XXXX.nii.gz + SOURCE/labelsTr/amos_XXXX.nii.gz (training),\n"
        "  optional SOURCE/imagesVa + labelsVa (validation), SOURCE/imagesTs (test), SOURCE/dataset.json;\n"
        "  amos_0001..0500 are CT, amos_0501.. MRI"
    )
    rules = MetricRules(
        metrics=("Dice", "NSD"),
        both_empty={"Dice": 1.0, "NSD": 1.0},
        one_empty={"Dice": 0.0, "NSD": 0.0},
        default_tolerance=1.0,
        notes=(
            "NSD: normalised surface Dice (DeepMind's surfel-area definition, MONAI use_subvoxels=True) at a "
            "tolerance of 1 mm for every organ; change it with --tolerance",
            "organ absent from reference and prediction -> 1 (Dice and NSD); present in only one -> 0",
        ),
        assumed=(
            "NSD tolerance 1 mm for every organ (no official AMOS22 evaluation code found: the organisers' "
            "JiYuanFeng/AMOS repository holds the website, an nnU-Net v1 baseline and splits, no metric code)",
            "empty masks: absent from both -> Dice 1, NSD 1; from one -> 0 (no official rule found)",
        ),
    )
    submission_format = "amos_XXXX.nii.gz (the test image's name), uint8 labels 1..15"

    def _number(self, stem: str) -> int | None:
        m = re.search(r"(\d+)$", stem)
        return int(m.group(1)) if m else None

    def find_cases(self, source: Path, **options):
        dj_path = source / "dataset.json"
        if dj_path.is_file():
            try:
                labels = json.loads(dj_path.read_text(encoding="utf-8")).get("labels", {})
            except json.JSONDecodeError as e:
                raise UserError(f"{dj_path} is not valid JSON: {e}") from e
            theirs = {int(k): str(v).strip().lower() for k, v in labels.items()}
            ours = {v: k for k, v in self.labels.items()}
            if sorted(theirs) != sorted(ours):
                raise UserError(
                    f"{dj_path} defines labels {sorted(theirs)}, AMOS22 has 0..15; is this the AMOS22 release?"
                )
        cases, skipped = [], []
        for sub_img, sub_lab, split in (
            ("imagesTr", "labelsTr", "Tr"),
            ("imagesVa", "labelsVa", "Tr"),
            ("imagesTs", None, "Ts"),
        ):
            labels = {strip_suffix(p.name): p for p in image_files(source / sub_lab)} if sub_lab else {}
            for image in image_files(source / sub_img):
                stem = strip_suffix(image.name)
                number = self._number(stem)
                if number is None:
                    skipped.append((f"{sub_img}/{image.name}", "not an amos_XXXX file name"))
                    continue
                modality = "MRI" if number >= MRI_FROM else "CT"
                label = labels.pop(stem, None)
                if modality not in self.modalities:
                    skipped.append(
                        (
                            f"{sub_img}/{image.name}",
                            f"{modality} case ({self.title}: {'+'.join(self.modalities)} only)",
                        )
                    )
                    continue
                if split == "Tr" and label is None:
                    skipped.append((f"{sub_img}/{image.name}", f"no label in {sub_lab}"))
                    continue
                cases.append(SourceCase(stem, [image], label, split, stem, {"modality": modality}))
            skipped += [(f"{sub_lab}/{p.name}", "no image with this name") for p in labels.values()]
        return cases, skipped


class AMOS22Task2(AMOS22):
    name = "amos22-task2"
    title = "AMOS22 task 2 (CT + MRI)"
    dataset_name = "AMOS22task2"
    channel_names = {"0": "either_CT_or_MR"}  # nnU-Net's choice: z-score per image for both modalities
    modalities = ("CT", "MRI")


class AMOS22MRI(AMOS22):
    """The MRI cases only: the MR-only nnU-Net that BA-Net's AMOS MRI entry was ensembled with."""

    name = "amos22-mri"
    title = "AMOS22 MRI cases"
    dataset_name = "AMOS22MRI"
    channel_names = {"0": "MRI"}
    modalities = ("MRI",)
