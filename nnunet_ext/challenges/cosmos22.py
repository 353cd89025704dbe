"""COSMOS22: Carotid Vessel Wall Segmentation and Atherosclerosis Diagnosis (MICCAI 2022), 3D MR.

The training labels are contours on some axial slices, in CASCADE's files. We read them as the 1st-place entry
did (ShishuaiHu/Label-Propagation, ``convertor/convert.py``, the only public code that read the released files):

    SOURCE/<case>/                       one folder per case
        *.dcm                            the 3D MR as a DICOM series (one file per slice), or ONE image file
                                         (.nii.gz/.nii/.mha/.nrrd) in the case folder
        <case>L.QVJ, <case>R.QVJ         CASCADE project of the left / right carotid: the side is the letter
                                         before .QVJ; it names its contour file (QVAS_Loaded_Series_List/
                                         QVASSeriesFileName, relative to the case folder) and holds the
                                         per-slice status (Location_Property)
        <the .QVS each QVJ names>        the contours (QVAS XML)

* QVS: the k-th ``QVAS_Image`` element is slice k (0-based, the SimpleITK array's first axis); a slice is
  annotated when it has a ``QVAS_Contour``; ``ContourType`` ``Lumen`` and ``Outer Wall``; ``Point x= y=`` are
  on a 512 x 512 grid whatever the image size: column ``x / 512 * width``, row ``y / 512 * height``,
  rounded half to even (Python's ``round``), consecutive repeats dropped.
* Mask of a contour: its rounded points set on the slice, then holes filled (``binary_fill_holes``); we also
  draw the straight segments between consecutive points (closed), which changes nothing when the points are
  8-connected, as on CASCADE's dense contours, and keeps a sparse contour closed. Wall = outer-wall mask minus
  lumen mask.
* QVJ status: slice = ``Location@Index`` + the bifurcation slice
  (``QVAS_System_Info/BifurcationLocation/BifurcationImageIndex@ImageIndex``, -1 if absent); only ``IQ > 1``
  counts: ``AHAStatus == 1`` normal wall (label 2), ``> 1`` atherosclerotic (label 3). An annotated slice
  without a status takes the nearest status slice's (ties: the first listed), as the winning entry did between
  its first and last status slice; outside that range the entry's wall would become background, here the
  slice is left unannotated (ignore label) and listed in dataset.json (``slices_without_status``).

Annotated slices get 0 background, 1 lumen, 2 normal wall, 3 atherosclerotic wall; every other slice gets
nnU-Net's ignore label (4): the input of ``nnunet-ext labelprop`` (the winning entry instead copied the
nearest annotated slice into the gaps; see docs/labelprop.md). By default each volume is split into halves along
x as the winning entry's split: the left carotid's case ``<case>_L`` is x >= width // 2, the right ``<case>_R``
x < width // 2 (contours outside their half are refused). ``--no-split-sides`` keeps whole volumes. Case
folders without QVJ files become test cases (imagesTs, halves named the same way). ``nnunet-ext submit
cosmos22`` puts the halves back together.

Metrics: the challenge's QuanM is not defined in our references and is not computed; ``evaluate`` reports
Dice per class (lumen, wall = 2|3, normal wall, atherosclerotic wall) on the annotated slices (ignore voxels
left out).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from nnunet_ext.challenges.base import (
    Challenge,
    EvalClass,
    MetricRules,
    RawDatasetWriter,
    SourceCase,
    image_files,
    write_label_like,
)
from nnunet_ext.core.errors import UserError

LUMEN, NORMAL_WALL, ATHERO_WALL, IGNORE = 1, 2, 3, 4
#: CASCADE's contour coordinates are on a 512 x 512 grid (convertor/convert.py: x / 512 * width)
CONTOUR_GRID = 512.0
QVJ_NAME = re.compile(r"(.*)([LR])\.qvj", re.IGNORECASE)


def _side_of(path: Path) -> str | None:
    """``L`` / ``R`` from a QVJ file name ``<case>L.QVJ`` / ``<case>R.QVJ``."""
    m = QVJ_NAME.fullmatch(path.name)
    return m.group(2).upper() if m else None


def _xml_root(path: Path):
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path.name} is not valid XML: {e}") from e


def read_qvj(path: Path) -> dict:
    """``{"qvs": contour file name, "status": {slice: atherosclerotic (bool)}, "bifurcation": slice or -1}``."""
    root = _xml_root(path)
    qvs = root.findtext("QVAS_Loaded_Series_List/QVASSeriesFileName")
    if not qvs or not qvs.strip():
        raise ValueError(f"{path.name}: no QVAS_Loaded_Series_List/QVASSeriesFileName (the contour file)")
    bifurcation = -1
    index = root.find("QVAS_System_Info/BifurcationLocation/BifurcationImageIndex")
    if index is not None and index.get("ImageIndex") is not None:
        bifurcation = int(index.get("ImageIndex"))
    status: dict[int, bool] = {}
    for loc in root.iter("Location"):
        try:
            z = int(loc.get("Index")) + bifurcation
            quality = int(loc.findtext("IQ"))
            aha = float(loc.findtext("AHAStatus"))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{path.name}: Location without integer Index / IQ and numeric AHAStatus ({e})"
            ) from e
        if quality > 1 and aha == 1:
            status[z] = False
        elif quality > 1 and aha > 1:
            status[z] = True
    return {"qvs": qvs.strip(), "status": status, "bifurcation": bifurcation}


def parse_qvs(path: Path, width: int, height: int) -> dict[int, dict]:
    """``{slice: {"lumen": (n, 2) array of (column, row) | None, "outer": ... | None}}`` of the annotated slices,
    points scaled from CASCADE's 512 grid to ``width`` x ``height`` pixels."""
    root = _xml_root(path)
    slices: dict[int, dict] = {}
    for z, image in enumerate(root.findall("QVAS_Image")):
        contours = image.findall("QVAS_Contour")
        if not contours:
            continue
        entry: dict = {"lumen": None, "outer": None}
        for contour in contours:
            kind = (contour.findtext("ContourType") or "").strip()
            key = {"Lumen": "lumen", "Outer Wall": "outer"}.get(kind)
            if key is None or entry[key] is not None:  # the entry reads the first contour of each type
                continue
            points = []
            for p in contour.findall("Contour_Point/Point"):
                try:
                    x = float(p.get("x")) / CONTOUR_GRID * width
                    y = float(p.get("y")) / CONTOUR_GRID * height
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path.name} slice {z}: a Point without numeric x / y") from e
                if not points or points[-1] != (x, y):
                    points.append((x, y))
            entry[key] = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        slices[z] = entry
    return slices


def contour_mask(points: np.ndarray, shape_yx) -> np.ndarray:
    """The filled contour: rounded points (half to even, as Python's ``round``) joined by straight segments,
    holes filled."""
    from scipy.ndimage import binary_fill_holes
    from skimage.draw import line

    cols, rows = np.rint(points[:, 0]).astype(int), np.rint(points[:, 1]).astype(int)
    mask = np.zeros(shape_yx, bool)
    mask[rows, cols] = True
    for k in range(len(rows)):
        rr, cc = line(rows[k - 1], cols[k - 1], rows[k], cols[k])
        mask[rr, cc] = True
    return binary_fill_holes(mask)


def nearest_status(z: int, status: dict[int, bool]) -> bool | None:
    """The wall status of slice ``z``: its own, else the nearest status slice's between the first and last
    status slice (ties: the first listed), else None."""
    if z in status:
        return status[z]
    if not status or not min(status) <= z <= max(status):
        return None
    return status[min(status, key=lambda s: abs(s - z))]


def read_case_image(folder: Path):
    """The case's 3D image: a DICOM series in ``folder`` or its single image file."""
    import SimpleITK as sitk

    dicoms = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    if dicoms:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not ids:
            raise ValueError(f"{folder.name}: .dcm files but no readable DICOM series")
        files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i) for i in ids), key=len)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()
    images = image_files(folder)
    if len(images) != 1:
        raise ValueError(
            f"{folder.name}: expected a DICOM series (*.dcm) or exactly one image file, found {[p.name for p in images]}"
        )
    return sitk.ReadImage(str(images[0]))


class COSMOS22(Challenge):
    name = "cosmos22"
    title = "COSMOS22"
    url = "https://vessel-wall-segmentation-2022.grand-challenge.org/"
    dataset_name = "COSMOS22"
    labels = {
        "background": 0,
        "lumen": LUMEN,
        "normal_wall": NORMAL_WALL,
        "atherosclerotic_wall": ATHERO_WALL,
    }
    channel_names = {"0": "MRI"}
    layout = (
        "  SOURCE/<case>/*.dcm (3D MR DICOM series) or one image file SOURCE/<case>/<name>.nii.gz,\n"
        "  SOURCE/<case>/<case>L.QVJ and <case>R.QVJ (CASCADE projects of the left / right carotid), each naming\n"
        "  its contour file SOURCE/<case>/<...>.QVS (QVAS_Loaded_Series_List/QVASSeriesFileName); as read by the\n"
        "  1st-place entry (ShishuaiHu/Label-Propagation convertor/convert.py)"
    )
    options = (
        (
            "--no-split-sides",
            {"action": "store_true", "help": "cosmos22: keep whole volumes (no L/R halves)"},
        ),
    )
    rules = MetricRules(
        metrics=("Dice",),
        both_empty={"Dice": 1.0},
        one_empty={"Dice": 0.0},
        ignore_label=IGNORE,
        notes=(
            "QuanM, the official score, is not computed: its definition is not in our references",
            "reference voxels with the ignore label (unannotated slices) are left out",
            "class 'wall' = normal + atherosclerotic wall",
        ),
        assumed=(
            "QuanM, the official score: no definition found, not computed; we report Dice",
            "Dice of empty masks (no official evaluation code found): absent from both 1, from one 0",
        ),
    )
    submission_format = "<case>.nii.gz, the whole volume (halves put back), uint8 labels 1 lumen, 2/3 wall"

    def eval_classes(self, case_id: str) -> list[EvalClass]:
        return [
            EvalClass("lumen", (LUMEN,)),
            EvalClass("wall", (NORMAL_WALL, ATHERO_WALL)),
            EvalClass("normal_wall", (NORMAL_WALL,)),
            EvalClass("atherosclerotic_wall", (ATHERO_WALL,)),
        ]

    def output_labels(self, **options) -> dict:
        return {**self.labels, "ignore": IGNORE}

    def allowed_label_values(self) -> set[int]:
        return set(self.labels.values())

    def find_cases(self, source: Path, no_split_sides: bool = False, **options):
        cases, skipped = [], []
        for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
            projects = {}
            for p in sorted(folder.iterdir()):
                side = _side_of(p) if p.is_file() else None
                if side is None:
                    continue
                if side in projects:
                    skipped.append((f"{folder.name}/{p.name}", f"a second QVJ for side {side}: not read"))
                    continue
                projects[side] = p
            has_image = any(p.suffix.lower() == ".dcm" for p in folder.iterdir()) or image_files(folder)
            if not has_image:
                skipped.append((folder.name, "no DICOM series or image file in the case folder"))
                continue
            split = "Tr" if projects else "Ts"
            if projects and not no_split_sides:
                skipped += [
                    (f"{folder.name}_{side}", f"no {folder.name}{side}.QVJ for this side: half not converted")
                    for side in ("L", "R")
                    if side not in projects
                ]
            cases.append(SourceCase(folder.name, [folder], None, split, folder.name, {"projects": projects}))
        return cases, skipped

    # ------------------------------------------------------------------ conversion of one case
    def write_case(self, case: SourceCase, writer: RawDatasetWriter, **options) -> list[str]:
        split_sides = not options.get("no_split_sides", False)
        projects: dict[str, Path] = case.extra.get("projects", {})
        image = read_case_image(case.images[0])
        if image.GetDimension() != 3:
            return [f"the image is {image.GetDimension()}D, expected 3D"]
        nx, ny, nz = image.GetSize()
        full = {
            "size": [nx, ny, nz],
            "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection()),
        }
        if case.split == "Ts":
            self._write_volume_halves(case, writer, image, None, split_sides, full)
            return []
        problems: list[str] = []
        labelled: dict[str, np.ndarray] = {}
        annotated: dict[str, set[int]] = {}
        without_status: dict[str, list[int]] = {}
        for side, qvj in sorted(projects.items()):
            try:
                project = read_qvj(qvj)
                qvs = case.images[0] / project["qvs"]
                if not qvs.is_file():
                    raise ValueError(
                        f"{qvj.name} names the contour file {project['qvs']}, which is not in the case folder"
                    )
                slices = parse_qvs(qvs, nx, ny)
            except (ValueError, TypeError) as e:
                problems.append(str(e))
                continue
            vol = np.zeros((nz, ny, nx), np.uint8)
            done, missing = set(), []
            for z, entry in sorted(slices.items()):
                where = f"side {side} slice {z}"
                if not 0 <= z < nz:
                    problems.append(
                        f"{where}: {qvs.name} has more QVAS_Image elements than the image's {nz} slices"
                    )
                    continue
                if (
                    entry["lumen"] is None
                    or entry["outer"] is None
                    or not len(entry["lumen"])
                    or not len(entry["outer"])
                ):
                    problems.append(f"{where}: needs both a Lumen and an Outer Wall contour with points")
                    continue
                pts = np.rint(np.concatenate([entry["lumen"], entry["outer"]]))
                if pts.min() < 0 or pts[:, 0].max() > nx - 1 or pts[:, 1].max() > ny - 1:
                    problems.append(
                        f"{where}: contour points outside the {nx}x{ny} slice (CASCADE's 512 grid scaled)"
                    )
                    continue
                status = nearest_status(z, project["status"])
                if status is None:
                    missing.append(z)  # no wall status: the slice stays unannotated
                    continue
                lumen = contour_mask(entry["lumen"], (ny, nx))
                wall = contour_mask(entry["outer"], (ny, nx)) & ~lumen
                vol[z][wall] = ATHERO_WALL if status else NORMAL_WALL
                vol[z][lumen] = LUMEN
                done.add(z)
            labelled[side], annotated[side], without_status[side] = vol, done, missing
        if problems:
            return problems
        self._write_volume_halves(
            case, writer, image, (labelled, annotated, without_status), split_sides, full
        )
        return []

    def _write_volume_halves(self, case, writer, image, labels, split_sides, full) -> None:
        """Write the halves (the winning entry's split.py: left = x >= width // 2, right = the rest) or the whole
        volume, with the sparse labels of the sides read (``labels``: (volumes, annotated slices, slices
        without status) per side; None for a test case)."""
        nx = image.GetSize()[0]
        half = nx // 2
        halves = {"L": (half, nx), "R": (0, half)}
        if not split_sides:
            parts = {"": (0, nx)}
        elif labels is not None:
            parts = {side: halves[side] for side in sorted(labels[0])}
            for side, (x0, x1) in parts.items():
                vol = labels[0][side]
                if vol[:, :, :x0].any() or vol[:, :, x1:].any():
                    where = f"x >= {half}" if side == "L" else f"x < {half}"
                    raise _CaseProblem(
                        f"side {side}: contours outside its half of the image ({where}, the winning entry's split); "
                        f"a flipped image? convert it with --no-split-sides"
                    )
        else:
            parts = halves
        for side, (x0, x1) in parts.items():
            case_id = f"{case.case_id}_{side}" if side else case.case_id
            crop = image[x0:x1, :, :]
            writer.write_image(crop, case_id, 0, case.split)
            meta = {"case": case.case_id, "side": side or None, "x_range": [x0, x1], "full": full}
            if labels is not None:
                labelled, annotated, without_status = labels
                if side:
                    vol, ann, missing = labelled[side], annotated[side], without_status[side]
                else:  # whole volume: union of the sides
                    vol = np.zeros_like(next(iter(labelled.values())))
                    for v in labelled.values():
                        vol = np.where(v > 0, v, vol)
                    ann = set().union(*annotated.values())
                    missing = sorted(set().union(*without_status.values()) - ann)
                sparse = vol[:, :, x0:x1].copy()
                keep = np.zeros(sparse.shape[0], bool)
                keep[sorted(ann)] = True
                sparse[~keep] = IGNORE
                writer.write_label(sparse, crop, case_id, case.split)
                meta["annotated_slices"] = sorted(int(z) for z in ann)
                if missing:
                    meta["slices_without_status"] = sorted(int(z) for z in missing)
            case.extra.setdefault("outputs", []).append((case_id, meta))

    def submission_cases(self, meta: dict) -> dict[str, list[str]]:
        """original case -> its converted test case ids (halves)."""
        out: dict[str, list[str]] = {}
        for cid, m in meta["cases"].items():
            if m.get("split") == "Ts":
                out.setdefault(m.get("case") or cid, []).append(cid)
        return out

    def write_submission(self, predictions: dict[str, Path], meta: dict, out: Path) -> list[str]:
        import SimpleITK as sitk

        written = []
        for original, parts in sorted(self.submission_cases(meta).items()):
            info = meta["cases"][parts[0]]
            full = info["full"]
            nx, ny, nz = full["size"]
            volume = np.zeros((nz, ny, nx), np.uint8)
            for cid in parts:
                pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions[cid])))
                x0, x1 = meta["cases"][cid]["x_range"]
                if pred.shape != (nz, ny, x1 - x0):
                    raise UserError(
                        f"prediction of {cid} has shape {pred.shape}, expected {(nz, ny, x1 - x0)} (the converted "
                        f"test image); predict the converted dataset's imagesTs."
                    )
                bad = sorted(set(np.unique(pred).tolist()) - self.allowed_label_values())
                if bad:
                    raise UserError(
                        f"prediction of {cid} holds label values {bad} that COSMOS22 does not define."
                    )
                volume[:, :, x0:x1] = pred
            reference = sitk.Image([int(v) for v in full["size"]], sitk.sitkUInt8)
            reference.SetSpacing(full["spacing"])
            reference.SetOrigin(full["origin"])
            reference.SetDirection(full["direction"])
            name = f"{original}.nii.gz"
            write_label_like(out / name, volume, reference)
            written.append(name)
        return written


class _CaseProblem(ValueError):
    """A problem of one case found while writing it (reported like the checks' problems)."""
