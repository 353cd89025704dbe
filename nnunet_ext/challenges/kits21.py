"""KiTS21: Kidney and Kidney Tumor Segmentation (MICCAI 2021), CT, kidney / tumour / cyst.

Source layout (the kits21 repository's ``kits21/data`` folder after its download script):

    SOURCE/case_XXXXX/imaging.nii.gz
    SOURCE/case_XXXXX/aggregated_MAJ_seg.nii.gz   (0 background, 1 kidney, 2 tumour, 3 cyst)

``--seg NAME`` picks another aggregated label file (``aggregated_AND_seg``, ``aggregated_OR_seg``;
KiTS23-style ``segmentation`` works too). Cases with an image but no label file become test cases
(imagesTs). ``--regions`` writes nnU-Net's region-based label definition (kidney = 1|2|3, masses = 2|3,
tumour = 2, ``regions_class_order`` (1, 3, 2)) as nnU-Net's KiTS converter does; the label files are the
same and the exported predictions hold 1/2/3 again.

Metrics: Dice and surface Dice over the hierarchical classes kidney + masses (1|2|3), masses (2|3) and tumour
(2) with the official tolerances of the kits21 repository (``kits21/configuration/labels.py``,
``HEC_SD_TOLERANCES_MM``: 1.0331 / 1.1329 / 1.1498 mm; 2.178 / 1.393 / 1.536 mm were an earlier version's).
Submissions are named ``case_XXXXX.nii.gz`` (``kits21/evaluation/evaluate_predictions.py`` requires it). Both empty -> 1, one empty -> 0 (Dice
and surface Dice). The official evaluation also averages over several sampled annotations; we score against
the one label file given.
"""

from __future__ import annotations

from pathlib import Path

from nnunet_ext.challenges.base import Challenge, EvalClass, MetricRules, SourceCase

HEC = (
    # kits21/configuration/labels.py HEC_SD_TOLERANCES_MM, final version (an earlier one, HEC_NSD_TOLERANCES_MM,
    # had 2.178 / 1.393 / 1.536 mm); computed by kits21/evaluation/compute_tolerances.py
    ("kidney_and_masses", (1, 2, 3), 1.0330772532390826),
    ("masses", (2, 3), 1.1328796488598762),
    ("tumour", (2,), 1.1498198361434828),
)


class KiTS21(Challenge):
    name = "kits21"
    title = "KiTS21"
    url = "https://kits21.kits-challenge.org/"
    dataset_name = "KiTS21"
    labels = {"background": 0, "kidney": 1, "tumour": 2, "cyst": 3}
    channel_names = {"0": "CT"}
    layout = (
        "  SOURCE/case_XXXXX/imaging.nii.gz + SOURCE/case_XXXXX/aggregated_MAJ_seg.nii.gz\n"
        "  (the kits21 repository's kits21/data folder; --seg picks another label file name)"
    )
    options = (
        ("--seg", {"default": "aggregated_MAJ_seg", "help": "kits21: label file name in each case folder"}),
        ("--regions", {"action": "store_true", "help": "kits21: nnU-Net region-based labels (HEC classes)"}),
    )
    rules = MetricRules(
        metrics=("Dice", "NSD"),
        both_empty={"Dice": 1.0, "NSD": 1.0},
        one_empty={"Dice": 0.0, "NSD": 0.0},
        notes=(
            "hierarchical classes kidney+masses (1,2,3), masses (2,3), tumour (2)",
            "surface Dice (DeepMind surfel areas via MONAI) at 1.033 / 1.133 / 1.150 mm (the kits21 repository's "
            "HEC_SD_TOLERANCES_MM)",
            "the official score averages over sampled annotations; we use the single reference file",
        ),
    )
    # kits21/evaluation/evaluate_predictions.py: "Predicted segmentations MUST be named case_XXXXX.nii.gz"
    submission_format = (
        "case_XXXXX.nii.gz (the input case's name, as the official evaluation requires), labels 1/2/3"
    )

    def eval_classes(self, case_id: str) -> list[EvalClass]:
        return [EvalClass(n, labels, tol) for n, labels, tol in HEC]

    def find_cases(self, source: Path, seg: str = "aggregated_MAJ_seg", **options):
        cases, skipped = [], []
        for folder in sorted(p for p in source.iterdir() if p.is_dir() and p.name.startswith("case_")):
            image = folder / "imaging.nii.gz"
            label = folder / f"{seg}.nii.gz"
            if not image.is_file():
                skipped.append((folder.name, "no imaging.nii.gz"))
                continue
            split = "Tr" if label.is_file() else "Ts"
            cases.append(
                SourceCase(folder.name, [image], label if split == "Tr" else None, split, folder.name)
            )
        return cases, skipped

    def output_labels(self, regions: bool = False, **options) -> dict:
        if regions:
            return {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
        return dict(self.labels)

    def extra_dataset_json(self, cases, regions: bool = False, **options) -> dict:
        return {"regions_class_order": [1, 3, 2]} if regions else {}

    def submission_name(self, case_id: str, meta: dict) -> str:
        return f"{meta.get('original') or case_id}.nii.gz"
