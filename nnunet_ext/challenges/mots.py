"""MOTS: the seven partially labelled CT sources of DoDNet (multi-organ and tumour segmentation).

Each source is converted on its own (``nnunet-ext convert mots-<task> SOURCE --id N``) into a plain nnU-Net
raw dataset with the source's own labels; ``nnunet-ext convert mots MOTS_DIR --id N`` converts all seven
(ids N..N+6) and prints the ``nnunet-ext tasks merge --preset mots`` command (``--merge-id M`` runs it).

| task (``mots-*``) | source and layout accepted | labels |
|---|---|---|
| liver | LiTS (``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]``, any sub-folder) or MSD Task03 / DoDNet ``0Liver`` (``imagesTr/liver_N.nii.gz`` + ``labelsTr/``) | 1 liver, 2 tumour |
| kidney | KiTS19 (``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``, any sub-folder, e.g. DoDNet ``1Kidney/origin``) | 1 kidney, 2 tumour |
| hepaticvessel | MSD Task08 / ``2HepaticVessel`` (``imagesTr`` + ``labelsTr``) | 1 vessel, 2 tumour |
| pancreas | MSD Task07 / ``3Pancreas`` | 1 pancreas, 2 tumour |
| colon | MSD Task10 / ``4Colon`` | 1 tumour |
| lung | MSD Task06 / ``5Lung`` | 1 tumour |
| spleen | MSD Task09 / ``6Spleen`` | 1 spleen |

MSD ``imagesTs`` (no labels) become imagesTs. ``--test-list FILE`` (DoDNet's ``MOTS_test.txt``: one case per
line, its image path first) moves the listed labelled cases to imagesTs/labelsTs, which reproduces DoDNet's
920 / 235 split when its list is given.

Metrics (DoDNet's evaluation as we read it; configurable): per task, Dice and HD95 of the organ (organ + tumour
labels, the vessel alone for hepatic vessel) and the tumour; HD95 is MedPy's definition (95th percentile of
both directions' surface distances pooled) in voxels (spacing 1); an empty prediction or reference (not both)
scores 373.12866; Dice = 2|P∩G| / (|P| + |G| + 1).
"""

from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.challenges.base import (
    Challenge,
    EvalClass,
    MetricRules,
    SourceCase,
    image_files,
    strip_suffix,
)
from nnunet_ext.errors import UserError

HD95_PENALTY = 373.12866
RULES = MetricRules(
    metrics=("Dice", "HD95_pooled"),
    both_empty={"Dice": 0.0, "HD95_pooled": 0.0},
    one_empty={"Dice": 0.0, "HD95_pooled": HD95_PENALTY},
    unit_spacing=True,
    dice_smooth=1.0,
    notes=(
        "DoDNet's evaluation as we read its code: HD95 = MedPy hd95 (pooled 95th percentile) at spacing 1 "
        "(voxels), computed here from MONAI surface distances; an empty prediction or reference (not both) "
        f"scores {HD95_PENALTY}, both empty 0",
        "Dice = 2|P and G| / (|P| + |G| + 1) (DoDNet adds 1 to the denominator; both empty -> 0)",
        "organ = organ + tumour labels (hepatic vessel: the vessel label only), tumour = tumour label",
    ),
)

# task -> (DoDNet folder, MSD folder, layout kind, labels, organ labels, tumour labels)
SOURCES = {
    "liver": ("0Liver", "Task03_Liver", "lits", {"liver": 1, "tumour": 2}, (1, 2), (2,)),
    "kidney": ("1Kidney", "kits19", "kits19", {"kidney": 1, "tumour": 2}, (1, 2), (2,)),
    "hepaticvessel": (
        "2HepaticVessel",
        "Task08_HepaticVessel",
        "msd",
        {"vessel": 1, "tumour": 2},
        (1,),
        (2,),
    ),
    "pancreas": ("3Pancreas", "Task07_Pancreas", "msd", {"pancreas": 1, "tumour": 2}, (1, 2), (2,)),
    "colon": ("4Colon", "Task10_Colon", "msd", {"colon_tumour": 1}, None, (1,)),
    "lung": ("5Lung", "Task06_Lung", "msd", {"lung_tumour": 1}, None, (1,)),
    "spleen": ("6Spleen", "Task09_Spleen", "msd", {"spleen": 1}, (1,), None),
}
MSD_LAYOUT = (
    "  SOURCE/imagesTr/<name>_NNN.nii.gz + SOURCE/labelsTr/<name>_NNN.nii.gz, optional SOURCE/imagesTs/"
)


def _test_ids(test_list: str | None) -> set[str]:
    if not test_list:
        return set()
    path = Path(test_list).expanduser()
    if not path.is_file():
        raise UserError(
            f"--test-list {path} does not exist (DoDNet's MOTS_test.txt: one image path per line)."
        )
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        first = Path(line.split()[0])
        ids.add(_case_id_of(first))
    return ids


def _case_id_of(image: Path) -> str:
    if image.name.startswith("imaging."):
        return image.parent.name
    stem = strip_suffix(image.name)
    m = re.fullmatch(r"volume-(\d+)", stem)
    return f"liver_{m.group(1)}" if m else stem


class MOTSSource(Challenge):
    """One of the seven MOTS sources."""

    channel_names = {"0": "CT"}
    rules = RULES
    options = (
        ("--test-list", {"default": None, "help": "mots: DoDNet's MOTS_test.txt (cases -> imagesTs)"}),
    )
    submission_format = "<task>/<source case name>.nii.gz with the source's label values"

    def __init__(self, task: str):
        dodnet, msd, kind, labels, organ, tumour = SOURCES[task]
        self.task, self.kind = task, kind
        self.name = f"mots-{task}"
        self.title = f"MOTS {task} ({msd if kind != 'kits19' else 'KiTS19'})"
        self.url = "https://github.com/jianpengz/DoDNet"
        self.dataset_name = f"MOTS{task.capitalize()}"
        self.labels = {"background": 0, **labels}
        self.organ, self.tumour = organ, tumour
        self.folder_names = (dodnet, msd)
        self.layout = {
            "lits": "  LiTS: SOURCE/**/volume-N.nii[.gz] + SOURCE/**/segmentation-N.nii[.gz], or the MSD layout:\n"
            + MSD_LAYOUT,
            "kits19": "  KiTS19: SOURCE/**/case_XXXXX/imaging.nii.gz + segmentation.nii.gz",
            "msd": MSD_LAYOUT,
        }[kind]

    def eval_classes(self, case_id: str) -> list[EvalClass]:
        out = []
        if self.organ:
            out.append(EvalClass(f"{self.task}_organ", self.organ))
        if self.tumour:
            out.append(EvalClass(f"{self.task}_tumour", self.tumour))
        return out

    def find_cases(self, source: Path, test_list: str | None = None, **options):
        tests = _test_ids(test_list)
        if self.kind == "kits19":
            pairs = [(p, p.parent / "segmentation.nii.gz") for p in sorted(source.rglob("imaging.nii.gz"))]
            cases = [
                SourceCase(img.parent.name, [img], seg if seg.is_file() else None, "Tr", img.parent.name)
                for img, seg in pairs
            ]
            skipped = []
        elif self.kind == "lits" and not (source / "imagesTr").is_dir():
            volumes = sorted(
                p for p in source.rglob("volume-*") if re.fullmatch(r"volume-\d+\.nii(\.gz)?", p.name)
            )
            segs = {
                re.search(r"\d+", p.name).group(0): p
                for p in source.rglob("segmentation-*")
                if re.fullmatch(r"segmentation-\d+\.nii(\.gz)?", p.name)
            }
            cases, skipped = [], []
            for vol in volumes:
                number = re.search(r"\d+", vol.name).group(0)
                cases.append(
                    SourceCase(f"liver_{number}", [vol], segs.pop(number, None), "Tr", strip_suffix(vol.name))
                )
            skipped += [(str(p.relative_to(source)), "no volume-N with this number") for p in segs.values()]
        else:
            labels = {strip_suffix(p.name): p for p in image_files(source / "labelsTr")}
            cases, skipped = [], []
            for img in image_files(source / "imagesTr"):
                stem = strip_suffix(img.name)
                if stem.startswith("._"):
                    continue
                cases.append(SourceCase(stem, [img], labels.pop(stem, None), "Tr", stem))
            for img in image_files(source / "imagesTs"):
                stem = strip_suffix(img.name)
                cases.append(SourceCase(stem, [img], None, "Ts", stem))
            skipped += [(f"labelsTr/{p.name}", "no image with this name") for p in labels.values()]
        out = []
        for case in cases:
            if case.label is None and case.split == "Tr":
                case.split = "Ts"  # an image without label: test case
            elif case.case_id in tests:
                case.split = "Ts"
            out.append(case)
        unknown = tests - {c.case_id for c in out}
        if unknown and test_list:
            skipped += [
                (cid, "listed in --test-list but not found in this source") for cid in sorted(unknown)
            ]
        return out, skipped


MOTS_SOURCES = {task: MOTSSource(task) for task in SOURCES}


def _unified_labels() -> dict[str, int]:
    """The merged label space of ``tasks merge --preset mots`` (first appearance order, as plan_merge)."""
    from nnunet_ext.merge import MOTS_PRESET

    order: list[str] = []
    for entry in MOTS_PRESET["tasks"].values():
        for name in entry["labels"].values():
            if name not in order:
                order.append(name)
    return {"background": 0, **{n: i + 1 for i, n in enumerate(order)}}


class MOTS(Challenge):
    """The merged MOTS dataset (``tasks merge --preset mots``): evaluation per task by case prefix."""

    name = "mots"
    title = "MOTS (7 partially labelled sources)"
    url = "https://github.com/jianpengz/DoDNet"
    rules = RULES
    options = (
        (
            "--merge-id",
            {"type": int, "default": None, "help": "mots: also merge the 7 datasets into this id"},
        ),
        ("--test-list", {"default": None, "help": "mots: DoDNet's MOTS_test.txt (cases -> imagesTs)"}),
    )
    submission_format = "<task>/<source case name>.nii.gz with each source's own label values"
    layout = (
        "  MOTS_DIR/<source> for each of the seven sources, named as DoDNet (0Liver, 1Kidney, 2HepaticVessel, "
        "3Pancreas,\n  4Colon, 5Lung, 6Spleen) or as released (Task03_Liver or LiTS, kits19, Task08_HepaticVessel, "
        "Task07_Pancreas,\n  Task10_Colon, Task06_Lung, Task09_Spleen); each source in its own layout "
        "(see `nnunet-ext convert --list`)"
    )

    @property
    def labels(self) -> dict[str, int]:  # type: ignore[override]
        return _unified_labels()

    def task_of(self, case_id: str) -> str:
        for task in SOURCES:
            if case_id.startswith(f"{task}_"):
                return task
        raise UserError(
            f"case {case_id} starts with no MOTS task prefix ({', '.join(t + '_' for t in SOURCES)}); evaluate the "
            f"merged dataset (nnunet-ext tasks merge --preset mots), or a single source with --challenge mots-<task>."
        )

    def eval_classes(self, case_id: str) -> list[EvalClass]:
        from nnunet_ext.merge import MOTS_PRESET

        task = self.task_of(case_id)
        unified = self.labels
        source = MOTS_SOURCES[task]
        to_unified = {int(v): unified[n] for v, n in MOTS_PRESET["tasks"][task]["labels"].items()}
        return [
            EvalClass(c.name, tuple(to_unified[v] for v in c.labels)) for c in source.eval_classes(case_id)
        ]

    def find_source_folders(self, source: Path) -> dict[str, Path]:
        found, missing = {}, []
        for task, (dodnet, msd, *_rest) in SOURCES.items():
            names = {dodnet.lower(), msd.lower()} | ({"lits"} if task == "liver" else set())
            hits = [p for p in sorted(source.iterdir()) if p.is_dir() and p.name.lower() in names]
            if hits:
                found[task] = hits[0]
            else:
                missing.append(f"{task} ({dodnet} or {msd})")
        if missing:
            raise UserError(f"{source}: no folder for {', '.join(missing)}.\n{self.expected_layout()}")
        return found

    # ------------------------------------------------------------------ submission from the merged dataset
    def submission_meta(self, folder: Path, dataset_json: dict) -> dict:
        """Test cases of a merged MOTS dataset: task, source case name, unified -> source label values."""
        import json

        from nnunet_ext.challenges.base import META_KEY

        merge = dataset_json.get("nnunet_ext_merge")
        if not merge:
            raise UserError(
                f"{folder} is not a merged dataset (no nnunet_ext_merge in dataset.json); pass the dataset written "
                f"by `nnunet-ext tasks merge --preset mots` (or use submit mots-<task> with a single source)."
            )
        unified = dataset_json["labels"]
        per_task = {}
        for task, entry in merge.items():
            src_meta = {}
            src_json = Path(entry["source"]) / "dataset.json"
            if src_json.is_file():
                src_meta = json.loads(src_json.read_text(encoding="utf-8")).get(META_KEY, {}).get("cases", {})
            to_source = {int(unified[name]): int(v) for v, name in entry["labels"].items() if name in unified}
            per_task[task] = (src_meta, to_source)
        cases = {}
        ending_len = len(dataset_json.get("file_ending", ".nii.gz")) + 5
        for p in sorted((folder / "imagesTs").glob("*_0000*")):
            cid = p.name[:-ending_len]
            task = self.task_of(cid)
            if task not in per_task:
                raise UserError(f"test case {cid}: task {task} is not one of the merged dataset's tasks.")
            src_meta, to_source = per_task[task]
            local = cid[len(task) + 1 :]
            original = src_meta.get(local, {}).get("original") or local
            cases[cid] = {"split": "Ts", "task": task, "original": original, "to_source": to_source}
        return {"cases": cases}

    def write_submission(self, predictions: dict[str, Path], meta: dict, out: Path) -> list[str]:
        import numpy as np
        import SimpleITK as sitk

        from nnunet_ext.challenges.base import write_label_like

        written = []
        for cid, path in sorted(predictions.items()):
            info = meta["cases"][cid]
            image = sitk.ReadImage(str(path))
            pred = sitk.GetArrayFromImage(image).astype(np.int64)
            lut = np.zeros(max(max(info["to_source"], default=0), int(pred.max(initial=0))) + 1, np.uint8)
            for u, s in info["to_source"].items():
                lut[int(u)] = s
            name = f"{info['task']}/{info['original']}.nii.gz"
            write_label_like(out / name, lut[pred], image)  # other tasks' structures -> background
            written.append(name)
        return written
