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

MSD ``imagesTs`` (no labels) become imagesTs. DoDNet's test split (``MOTS_test.txt`` of jianpengz/DoDNet, 235
labelled cases, shipped as ``mots_test.json``) moves the listed cases of each source to imagesTs/labelsTs by
default (``--test-list dodnet``), which gives DoDNet's 920 / 235 split; ``--test-list none`` keeps every labelled
case in imagesTr, ``--test-list FILE`` reads another list (DoDNet's format: one case per line, its image path
first, or bare case ids as in DoDNet's ``data_list/MOTS/MOTS_test.txt``).

Metrics: DoDNet's ``a_DynConv/postp.py`` on the grid of its ``dataset/re_spacing.py``: prediction and
reference are resampled to 1.5 x 0.8 x 0.8 mm (z, y, x) with scikit-image ``resize(order=0, ...)`` exactly as
``re_spacing.py`` calls it (see :func:`dodnet_grid`), then per task the Dice (``2|P∩G| / (|P| + |G| + 1)``) and
MedPy's ``hd95`` at voxel spacing 1 of the organ (organ + tumour labels, the vessel alone for hepatic vessel)
and the tumour; an empty prediction or reference (not both) scores HD95 373.12866, both empty 0.
Post-processing: :func:`dodnet_postprocess` (``nnunet-ext postprocess --preset mots``).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from nnunet_ext.challenges.base import (
    Challenge,
    EvalClass,
    LabelVolume,
    MetricRules,
    SourceCase,
    image_files,
    strip_suffix,
)
from nnunet_ext.core.errors import UserError

HD95_PENALTY = 373.12866
#: DoDNet's target spacing (z, y, x) in mm, ``dataset/re_spacing.py`` (the same for all seven tasks)
DODNET_SPACING = (1.5, 0.8, 0.8)
#: ``postp.py``: tumour components of at most this many voxels (on DoDNet's grid) are removed
DODNET_MIN_TUMOUR_VOXELS = 50
RULES = MetricRules(
    metrics=("Dice", "HD95_pooled"),
    both_empty={"Dice": 0.0, "HD95_pooled": 0.0},
    one_empty={"Dice": 0.0, "HD95_pooled": HD95_PENALTY},
    unit_spacing=True,
    dice_smooth=1.0,
    notes=(
        "DoDNet's evaluation (a_DynConv/postp.py, jianpengz/DoDNet): prediction and reference are first resampled "
        "to DoDNet's grid, 1.5 x 0.8 x 0.8 mm (z, y, x), with skimage resize(order=0) as dataset/re_spacing.py "
        "calls it; HD95 = MedPy hd95 (both directions' surface distances pooled, 95th percentile) in voxels of "
        f"that grid; an empty prediction or reference (not both) scores {HD95_PENALTY}, both empty 0",
        "Dice = 2|P and G| / (|P| + |G| + 1) on the same grid (DoDNet adds 1 to the denominator; both empty -> 0)",
        "organ = organ + tumour labels (hepatic vessel: the vessel label only), tumour = tumour label",
        "DoDNet's post-processing is not applied here: run nnunet-ext postprocess --preset mots first",
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
TEST_LIST_HELP = (
    "mots: the test split: 'dodnet' (default: DoDNet's MOTS_test.txt, 235 cases, shipped), 'none', or a file "
    "(one case per line: DoDNet's image path or a case id)"
)


# ============================================================================================ DoDNet's grid
def dodnet_grid(array: np.ndarray, spacing, task: str = "") -> np.ndarray:
    """A label map ((z, y, x), ``spacing`` in mm) on DoDNet's 1.5 x 0.8 x 0.8 mm grid, as
    ``dataset/re_spacing.py`` resamples its labels: the output size is ``int(size * spacing / target)`` per
    axis and the values come from scikit-image ``resize(label.astype(float), size, order=0, mode='edge',
    cval=0, clip=True, preserve_range=True)`` rounded back to integers. ``resize`` keeps its default
    anti-aliasing (a Gaussian of sigma ``(factor - 1) / 2`` along axes that shrink, before the nearest-neighbour
    pick), as in DoDNet's call; KiTS19 labels went through a branch without ``mode`` (skimage's default,
    ``'reflect'``), used here for ``task='kidney'``."""
    from skimage.transform import resize

    ratio = np.asarray(spacing, dtype=np.float64) / np.asarray(DODNET_SPACING, dtype=np.float64)
    shape = tuple(int(n * r) for n, r in zip(np.asarray(array.shape), ratio))
    if min(shape) < 1:
        raise UserError(
            f"a {array.shape} label map at spacing {tuple(spacing)} mm has no voxel on DoDNet's "
            f"{DODNET_SPACING} mm grid; evaluate full volumes."
        )
    out = resize(
        np.asarray(array).astype(np.float64),
        shape,
        order=0,
        mode="reflect" if task == "kidney" else "edge",
        cval=0,
        clip=True,
        preserve_range=True,
    )
    return np.round(out).astype(np.asarray(array).dtype)


# ============================================================================================ post-processing
def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components: DoDNet calls ``skimage.measure.label(.., neighbors=4, connectivity=2)`` and
    scikit-image <= 0.17 (the last accepting ``neighbors``) lets ``neighbors=4`` win: connectivity 1."""
    from scipy import ndimage

    return ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, 1))


def _keep_largest(mask: np.ndarray, keep: int) -> np.ndarray:
    """``continues_region_extract_organ``: the ``keep`` largest components of ``mask``."""
    comps, n = _components(mask)
    if n <= keep:
        return mask.copy()
    sizes = np.bincount(comps.ravel())[1:]
    kept = np.argsort(-sizes, kind="stable")[:keep] + 1
    return np.isin(comps, kept)


def _drop_small(mask: np.ndarray, max_size: float) -> np.ndarray:
    """``continues_region_extract_tumor``: components of at most ``max_size`` voxels are removed, unless there
    is only one component."""
    comps, n = _components(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(comps.ravel())
    small = np.flatnonzero(sizes <= max_size)
    return mask & ~np.isin(comps, small[small > 0])


#: task -> (organ components kept, tumour rule): DoDNet's postp.py per task id
DODNET_POSTPROCESSING = {
    "liver": (1, "drop_small"),
    "kidney": (2, "largest"),
    "hepaticvessel": (None, "drop_small"),
    "pancreas": (1, "drop_small"),
    "colon": (None, "largest"),
    "lung": (None, "largest"),
    "spleen": (1, None),
}


def dodnet_postprocess(
    seg: np.ndarray,
    task: str,
    organ: int | None,
    tumour: int | None,
    voxel_volume: float | None = None,
) -> np.ndarray:
    """DoDNet's post-processing (``a_DynConv/postp.py``) of ``task``'s structures in the label map ``seg``
    (``organ`` / ``tumour``: their values in ``seg``, None if the task has none); other labels are untouched.

    * liver, pancreas: the largest component of organ + tumour is kept (the rest -> background); tumour
      components of at most 50 voxels are removed when there are several (they become organ, as DoDNet's organ
      mask keeps them);
    * kidney: the two largest components of kidney + tumour; the largest tumour component (others -> kidney);
    * hepatic vessel: tumour components of at most 50 voxels are removed when there are several (-> background;
      the vessel is not post-processed);
    * colon, lung: the largest tumour component; spleen: the largest spleen component.

    Components are 6-connected (see :func:`_components`). ``voxel_volume`` (mm^3): the 50-voxel threshold is
    taken as a volume on DoDNet's grid (50 x 0.96 mm^3) and converted to voxels of ``seg``; None: 50 voxels.
    """
    if task not in DODNET_POSTPROCESSING:
        raise UserError(f"unknown MOTS task {task!r}; choose one of {', '.join(DODNET_POSTPROCESSING)}.")
    keep_organ, tumour_rule = DODNET_POSTPROCESSING[task]
    max_small = float(DODNET_MIN_TUMOUR_VOXELS)
    if voxel_volume is not None:
        max_small = DODNET_MIN_TUMOUR_VOXELS * float(np.prod(DODNET_SPACING)) / float(voxel_volume)
    seg = np.array(seg, copy=True)
    if keep_organ is not None and organ is not None:
        members = [organ] + ([tumour] if tumour is not None and task != "hepaticvessel" else [])
        region = np.isin(seg, members)
        seg[region & ~_keep_largest(region, keep_organ)] = 0
    if tumour_rule is not None and tumour is not None:
        mask = seg == tumour
        kept = _keep_largest(mask, 1) if tumour_rule == "largest" else _drop_small(mask, max_small)
        # a removed tumour piece inside the organ stays organ (DoDNet's organ mask is organ + tumour)
        inside_organ = organ is not None and task != "hepaticvessel"
        seg[mask & ~kept] = organ if inside_organ else 0
    return seg


def dodnet_postprocessing_plan(dataset_json: dict) -> list[tuple[str, int | None, int | None]]:
    """``[(task, organ value, tumour value)]`` of the MOTS tasks in a label map described by ``dataset_json``:
    a merged MOTS dataset (``tasks merge --preset mots``: unified label names) or one converted source
    (``convert mots-<task>``: the source's own labels)."""
    from nnunet_ext.challenges.base import META_KEY
    from nnunet_ext.multitask.merge import MOTS_PRESET

    labels = {
        str(k): v for k, v in dataset_json.get("labels", {}).items() if not isinstance(v, (list, tuple))
    }
    challenge = str(dataset_json.get(META_KEY, {}).get("challenge", ""))
    single = challenge[5:] if challenge.startswith("mots-") and challenge[5:] in SOURCES else None
    if single is None:  # a converted source without our metadata: its label names
        single = next((t for t, src in MOTS_SOURCES.items() if labels == src.labels), None)
    if single is not None:
        src = MOTS_SOURCES[single]
        return [(single, src.organ[0] if src.organ else None, src.tumour[0] if src.tumour else None)]
    plan = []
    for task, entry in MOTS_PRESET["tasks"].items():
        src = MOTS_SOURCES[task]
        names = entry["labels"]  # source value -> unified name
        organ = labels.get(names.get(str(src.organ[0]), "")) if src.organ else None
        tumour = labels.get(names.get(str(src.tumour[0]), "")) if src.tumour else None
        if organ is not None or tumour is not None:
            plan.append(
                (task, None if organ is None else int(organ), None if tumour is None else int(tumour))
            )
    if not plan:
        raise UserError(
            f"the labels {sorted(labels)} are neither a merged MOTS dataset's (tasks merge --preset mots) nor one "
            f"MOTS source's; --preset mots applies DoDNet's rules to MOTS predictions only."
        )
    return plan


def apply_dodnet_postprocessing(seg: np.ndarray, plan, voxel_volume: float | None = None) -> np.ndarray:
    """:func:`dodnet_postprocess` for every task of ``plan`` (:func:`dodnet_postprocessing_plan`)."""
    for task, organ, tumour in plan:
        seg = dodnet_postprocess(seg, task, organ, tumour, voxel_volume)
    return seg


# ============================================================================================ test split
@lru_cache(maxsize=1)
def dodnet_test_split() -> dict[str, tuple[str, ...]]:
    """DoDNet's MOTS test cases per task (source case names), from the shipped ``mots_test.json``."""
    data = json.loads((Path(__file__).with_name("mots_test.json")).read_text(encoding="utf-8"))
    return {task: tuple(cases) for task, cases in data["cases"].items()}


def _task_of_entry(entry: str) -> tuple[str | None, str]:
    """(task, source case name) of one test-list line's first field."""
    path = Path(entry)
    folders = {name.lower(): task for task, (dodnet, msd, *_r) in SOURCES.items() for name in (dodnet, msd)}
    folders["lits"] = "liver"
    task = next((folders[p.lower()] for p in path.parts[:-1] if p.lower() in folders), None)
    case = _case_id_of(path)
    if len(path.parts) == 1:  # a bare case id, e.g. DoDNet's data_list: liver_0, kidney_00000, colon_001
        m = re.fullmatch(r"kidney_(\d+)", case)
        if m:
            return "kidney", f"case_{m.group(1)}"
    if task is None:
        if case.startswith("case_"):
            task = "kidney"
        else:
            task = next((t for t in SOURCES if case.startswith(f"{t}_")), None)
    return task, case


def _test_ids(test_list: str | None, task: str) -> tuple[set[str], str]:
    """The listed test cases of ``task`` and a description of the list."""
    if test_list is None or str(test_list).lower() == "none":
        return set(), ""
    if str(test_list).lower() == "dodnet":
        return set(dodnet_test_split()[task]), "DoDNet's test list"
    path = Path(test_list).expanduser()
    if not path.is_file():
        raise UserError(
            f"--test-list {path} does not exist; pass 'dodnet' (DoDNet's split, shipped), 'none', or a file with "
            f"one case per line (DoDNet's MOTS_test.txt format)."
        )
    ids = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        line_task, case = _task_of_entry(line.split()[0])
        if line_task is None:
            raise UserError(
                f"{path} line {number}: cannot tell the MOTS task of {line.split()[0]!r}; give DoDNet's image path "
                f"(e.g. 0Liver/imagesTr/liver_0.nii.gz) or a case id with its task prefix (liver_0, kidney_00000)."
            )
        if line_task == task:
            ids.add(case)
    return ids, str(path)


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
    options = (("--test-list", {"default": "dodnet", "help": TEST_LIST_HELP}),)
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

    def score_case(self, pred, gt, case_id, metrics, tolerance=None):
        """Both label maps on DoDNet's grid (:func:`dodnet_grid`, in this source's label values), then the
        default scoring with :data:`RULES` (voxel units)."""
        return _score_on_dodnet_grid(self, self.task, pred.array, gt.array, gt.spacing, case_id, metrics)

    def postprocess(self, seg: np.ndarray, voxel_volume: float | None = None) -> np.ndarray:
        """DoDNet's post-processing of a label map in this source's label values."""
        organ = self.organ[0] if self.organ else None
        tumour = self.tumour[0] if self.tumour else None
        return dodnet_postprocess(seg, self.task, organ, tumour, voxel_volume)

    def find_cases(self, source: Path, test_list: str | None = None, **options):
        """The source's cases; ``test_list`` (the CLI's default: 'dodnet') moves the listed labelled cases of this
        task to the test split."""
        tests, list_name = _test_ids(test_list, self.task)
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
        unknown = sorted(tests - {c.case_id for c in out})
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            skipped.append(
                (
                    f"{len(unknown)} {self.task} test case(s)",
                    f"in {list_name} but not in this source: {shown}",
                )
            )
        return out, skipped


MOTS_SOURCES = {task: MOTSSource(task) for task in SOURCES}


def _score_on_dodnet_grid(challenge: Challenge, task: str, pred, gt, spacing, case_id, metrics):
    """``challenge``'s default scoring of two label maps in ``task``'s source label values, after both are
    resampled to DoDNet's grid (the spacing then is 1 voxel, :data:`RULES`)."""
    grid = (1.0, 1.0, 1.0)
    return Challenge.score_case(
        challenge,
        LabelVolume(dodnet_grid(pred, spacing, task), grid, None, "sitk"),
        LabelVolume(dodnet_grid(gt, spacing, task), grid, None, "sitk"),
        case_id,
        metrics,
    )


def _unified_labels() -> dict[str, int]:
    """The merged label space of ``tasks merge --preset mots`` (first appearance order, as plan_merge)."""
    from nnunet_ext.multitask.merge import MOTS_PRESET

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
        ("--test-list", {"default": "dodnet", "help": TEST_LIST_HELP}),
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
        from nnunet_ext.multitask.merge import MOTS_PRESET

        task = self.task_of(case_id)
        unified = self.labels
        source = MOTS_SOURCES[task]
        to_unified = {int(v): unified[n] for v, n in MOTS_PRESET["tasks"][task]["labels"].items()}
        return [
            EvalClass(c.name, tuple(to_unified[v] for v in c.labels)) for c in source.eval_classes(case_id)
        ]

    def to_source_values(self, task: str, seg: np.ndarray) -> np.ndarray:
        """A unified label map in ``task``'s source label values (other tasks' structures -> background)."""
        from nnunet_ext.multitask.merge import MOTS_PRESET

        unified = self.labels
        lut = np.zeros(max(max(unified.values()), int(np.max(seg, initial=0))) + 1, np.uint8)
        for value, name in MOTS_PRESET["tasks"][task]["labels"].items():
            lut[unified[name]] = int(value)
        return lut[np.asarray(seg, dtype=np.int64)]

    def score_case(self, pred, gt, case_id, metrics, tolerance=None):
        """Each case with its task's classes on DoDNet's grid: the unified maps are put in the task's source
        values (as DoDNet's files hold them, which matters for the resampling's anti-aliasing), resampled, and
        scored like ``mots-<task>``."""
        task = self.task_of(case_id)
        return _score_on_dodnet_grid(
            MOTS_SOURCES[task],
            task,
            self.to_source_values(task, pred.array),
            self.to_source_values(task, gt.array),
            gt.spacing,
            case_id,
            metrics,
        )

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
