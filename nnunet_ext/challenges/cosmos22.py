"""COSMOS22: Carotid Vessel Wall Segmentation and Atherosclerosis Diagnosis (MICCAI 2022), 3D MR.

The training labels are contours on some axial slices, in CASCADE's QVAS XML files (``.QVS``; one per
artery side). The converter rasterises them into sparse-slice label maps: annotated slices get 0 background,
1 lumen, 2 normal vessel wall, 3 atherosclerotic wall; every other slice gets nnU-Net's ignore label (4).
That is the input of ``nnunet-ext labelprop`` (see docs/labelprop.md).

Source layout (our reading of the release; the converter's errors quote it):

    SOURCE/<case>/                       one folder per case
        *.dcm                            the 3D MR as a DICOM series (one file per slice), or ONE image file
                                         (.nii.gz/.nii/.mha/.nrrd) in the case folder
        **/*_L.QVS, **/*_R.QVS           contours of the left / right carotid (any sub-folder, e.g.
                                         CASCADE-ICAL/, CASCADE-ICAR/; .xml accepted too); the side is read
                                         from the _L/_R suffix or an ICAL/ICAR folder name

XML schema (QVAS): ``<QVAS_Image ImageName="...I<n>">`` per annotated slice; ``n`` (the digits after the last
``I``) is the 1-based slice number along z (the SimpleITK array's first axis). Inside, ``<QVAS_Contour>``
elements with ``<ContourType>`` ``Lumen`` or ``Outer Wall`` and ``<Contour_Point><Point x=".." y=".."/>...``
in pixel coordinates (x = column, y = row; ``--contour-scale`` multiplies them, e.g. 1/2 for contours drawn on
a 2x zoomed grid). The slice status is an optional ``<Atherosclerosis>`` element (``1``/``yes``/``true``:
the wall is atherosclerotic, label 3; otherwise normal, label 2).

A pixel belongs to a contour if its centre lies inside the polygon (matplotlib's ``Path.contains_points``);
the wall is the outer-wall polygon minus the lumen. By default each volume is split into its left and right
halves along x (as the winning entry did) and each half becomes one case ``<case>_L`` / ``<case>_R``, so a slice
annotated on one side only is not background on the other; ``--no-split-sides`` keeps whole volumes (a slice is
then annotated if either side is). Case folders without contour files become test cases (imagesTs; halves
named by the image direction: L = towards the patient's left, +x in LPS). ``nnunet-ext submit cosmos22`` puts
the halves back together.

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
from nnunet_ext.errors import UserError

LUMEN, NORMAL_WALL, ATHERO_WALL, IGNORE = 1, 2, 3, 4
CONTOUR_SUFFIXES = (".qvs", ".xml")
TRUE_WORDS = ("1", "yes", "true", "atherosclerotic", "y")


def _side_of(path: Path) -> str | None:
    stem, parent = path.name.rsplit(".", 1)[0].upper(), path.parent.name.upper()
    if stem.endswith("_L") or "ICAL" in parent:
        return "L"
    if stem.endswith("_R") or "ICAR" in parent:
        return "R"
    return None


def parse_qvs(path: Path, scale: float = 1.0) -> dict[int, dict]:
    """``{slice index (0-based): {"lumen": [(x, y), ...] | None, "outer": [...] | None, "athero": bool}}``."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path.name} is not valid XML: {e}") from e
    slices: dict[int, dict] = {}
    for image in root.iter("QVAS_Image"):
        name = image.get("ImageName", "")
        m = re.search(r"I(\d+)$", name)
        if not m:
            raise ValueError(f"{path.name}: QVAS_Image ImageName={name!r} does not end with I<slice number>")
        entry = {"lumen": None, "outer": None, "athero": False}
        for contour in image.iter("QVAS_Contour"):
            kind = (contour.findtext("ContourType") or "").strip().lower()
            points = [(float(p.get("x")), float(p.get("y"))) for p in contour.iter("Point")]
            key = {"lumen": "lumen", "outer wall": "outer", "outerwall": "outer", "outer": "outer"}.get(kind)
            if key is None:
                raise ValueError(
                    f"{path.name} slice {m.group(1)}: unknown ContourType {kind!r} (Lumen / Outer Wall)"
                )
            if len(points) < 3:
                raise ValueError(f"{path.name} slice {m.group(1)}: {kind} contour with {len(points)} points")
            entry[key] = [(x * scale, y * scale) for x, y in points]
        status = (image.findtext("Atherosclerosis") or "").strip().lower()
        entry["athero"] = status in TRUE_WORDS
        if entry["lumen"] is None and entry["outer"] is None:
            continue  # an image element without contours: not annotated
        slices[int(m.group(1)) - 1] = entry
    return slices


def rasterize(polygon, shape_yx) -> np.ndarray:
    """Pixels (y, x) whose centre lies inside ``polygon`` ((x, y) points)."""
    from matplotlib.path import Path as MplPath

    ys, xs = np.mgrid[0 : shape_yx[0], 0 : shape_yx[1]]
    inside = MplPath(np.asarray(polygon)).contains_points(np.column_stack([xs.ravel(), ys.ravel()]))
    return inside.reshape(shape_yx)


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
        "  SOURCE/<case>/**/<...>_L.QVS and <...>_R.QVS (QVAS XML: QVAS_Image ImageName='..I<slice>' with\n"
        "  QVAS_Contour [ContourType Lumen | Outer Wall, Contour_Point/Point x= y= in pixels])"
    )
    options = (
        (
            "--no-split-sides",
            {"action": "store_true", "help": "cosmos22: keep whole volumes (no L/R halves)"},
        ),
        (
            "--contour-scale",
            {"type": float, "default": 1.0, "help": "cosmos22: factor applied to contour points"},
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
        assumed=("QuanM, the official score: no definition found, not computed; we report Dice",),
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
            contours = sorted(
                p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CONTOUR_SUFFIXES
            )
            has_image = any(p.suffix.lower() == ".dcm" for p in folder.iterdir()) or image_files(folder)
            if not has_image:
                skipped.append((folder.name, "no DICOM series or image file in the case folder"))
                continue
            split = "Tr" if contours else "Ts"
            if contours and not no_split_sides:
                sides = {_side_of(p) for p in contours}
                skipped += [
                    (f"{folder.name}_{side}", "no contour file for this side: half not converted")
                    for side in ("L", "R")
                    if side not in sides and None not in sides
                ]
            cases.append(SourceCase(folder.name, [folder], None, split, folder.name, {"contours": contours}))
        return cases, skipped

    # ------------------------------------------------------------------ conversion of one case
    def write_case(self, case: SourceCase, writer: RawDatasetWriter, **options) -> list[str]:
        split_sides = not options.get("no_split_sides", False)
        scale = float(options.get("contour_scale") or 1.0)
        contour_files = case.extra.get("contours", [])
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
        sides: dict[str, dict[int, dict]] = {}
        for path in contour_files:
            side = _side_of(path) or "?"
            try:
                parsed = parse_qvs(path, scale)
            except (ValueError, TypeError) as e:
                problems.append(str(e))
                continue
            if side in sides and set(sides[side]) & set(parsed):
                problems.append(f"two contour files for side {side} annotate the same slices")
            sides.setdefault(side, {}).update(parsed)
        if problems:
            return problems
        if split_sides and "?" in sides:
            return [
                "contour files without side (_L / _R suffix or ICAL / ICAR folder): "
                + ", ".join(p.name for p in contour_files if _side_of(p) is None)
                + "; name them, or pass --no-split-sides"
            ]
        # rasterise every side into its own sparse volume
        labelled: dict[str, np.ndarray] = {}
        annotated: dict[str, set[int]] = {}
        for side, slices in sides.items():
            vol = np.zeros((nz, ny, nx), np.uint8)
            for z, entry in sorted(slices.items()):
                where = f"side {side} slice {z + 1}"
                if not 0 <= z < nz:
                    problems.append(f"{where}: slice number outside the image's {nz} slices")
                    continue
                if entry["lumen"] is None or entry["outer"] is None:
                    problems.append(f"{where}: needs both a Lumen and an Outer Wall contour")
                    continue
                pts = np.asarray(entry["lumen"] + entry["outer"])
                if pts.min() < -0.5 or pts[:, 0].max() > nx - 0.5 or pts[:, 1].max() > ny - 0.5:
                    problems.append(
                        f"{where}: contour points outside the {nx}x{ny} slice (contours in another coordinate "
                        f"system? see --contour-scale)"
                    )
                    continue
                lumen = rasterize(entry["lumen"], (ny, nx))
                outer = rasterize(entry["outer"], (ny, nx))
                if not lumen.any() or not outer.any():
                    problems.append(f"{where}: a contour encloses no pixel centre")
                    continue
                if (lumen & ~outer).sum() > 0.1 * lumen.sum():
                    problems.append(f"{where}: the lumen contour is not inside the outer wall contour")
                    continue
                wall = outer & ~lumen
                vol[z][wall & (vol[z] == 0)] = ATHERO_WALL if entry["athero"] else NORMAL_WALL
                vol[z][lumen] = LUMEN
            labelled[side] = vol
            annotated[side] = set(slices)
        if problems:
            return problems
        self._write_volume_halves(case, writer, image, (labelled, annotated), split_sides, full)
        return []

    def _write_volume_halves(self, case, writer, image, labels, split_sides, full) -> None:
        nx = image.GetSize()[0]
        half = nx // 2
        if not split_sides:
            parts = {"": (0, nx)}
        elif labels is not None:
            labelled, _ = labels
            parts = {}
            for side, vol in labelled.items():
                xs = np.nonzero(vol.any(axis=(0, 1)))[0]
                centre = xs.mean() if len(xs) else 0
                parts[side] = (half, nx) if centre >= half else (0, half)
            if len(parts) == 2 and parts["L"] == parts["R"]:
                raise _CaseProblem("the left and right contours lie in the same half of the image")
            for side, (x0, x1) in parts.items():
                vol = labelled[side]
                if vol[:, :, :x0].any() or vol[:, :, x1:].any():
                    raise _CaseProblem(f"side {side}: contours cross the middle of the image (x = {half})")
        else:
            left_is_high = image.GetDirection()[0] > 0  # LPS: +x points to the patient's left
            parts = {"L": (half, nx), "R": (0, half)} if left_is_high else {"L": (0, half), "R": (half, nx)}
        for side, (x0, x1) in parts.items():
            case_id = f"{case.case_id}_{side}" if side else case.case_id
            crop = image[x0:x1, :, :]
            writer.write_image(crop, case_id, 0, case.split)
            meta = {"case": case.case_id, "side": side or None, "x_range": [x0, x1], "full": full}
            if labels is not None:
                labelled, annotated = labels
                if side:
                    vol, ann = labelled[side], annotated[side]
                else:  # whole volume: union of the sides
                    vol = np.zeros_like(next(iter(labelled.values())))
                    for v in labelled.values():
                        vol = np.where(v > 0, v, vol)
                    ann = set().union(*annotated.values())
                sparse = vol[:, :, x0:x1].copy()
                keep = np.zeros(sparse.shape[0], bool)
                keep[sorted(ann)] = True
                sparse[~keep] = IGNORE
                writer.write_label(sparse, crop, case_id, case.split)
                meta["annotated_slices"] = sorted(int(z) for z in ann)
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
