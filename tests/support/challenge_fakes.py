"""Test helpers (moved from tests/challenges/test_convert.py): COSMOS_SHAPE, SHAPE, _mk, ct, fake_amos, fake_cosmos, fake_kipa, fake_kits21, fake_mots, organ_label, outline, qvj, qvs, read, tree_hash, write, write_dicom_series."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.challenges import get_challenge

SHAPE = (6, 8, 8)  # z, y, x


def write(path: Path, array: np.ndarray, spacing=(0.7, 0.7, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def organ_label(values=(1, 2, 3, 4), shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 1:4, 1:4] = values[0]
    if len(values) > 1:
        lab[3:5, 4:7, 4:7] = values[1]
    for k, v in enumerate(values[2:]):
        lab[2 + k, 6, 1] = v
    return lab


def ct(seed=0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def fake_kipa(root: Path) -> Path:
    src = root / "kipa"
    for i in (1, 2, 3):
        write(src / "train" / "image" / f"{i}.nii.gz", ct(i))
        write(src / "train" / "label" / f"{i}.nii.gz", organ_label())
    write(src / "open" / "image" / "71.nii.gz", ct(9))
    return src


def fake_amos(root: Path) -> Path:
    src = root / "amos22"
    labels = {"0": "background", **{str(v): k for k, v in get_challenge("amos22-task1").labels.items() if v}}
    src.mkdir(parents=True)
    (src / "dataset.json").write_text(json.dumps({"labels": labels}))
    for n in (1, 2, 507):  # 507: MRI
        write(src / "imagesTr" / f"amos_{n:04d}.nii.gz", ct(n))
        write(src / "labelsTr" / f"amos_{n:04d}.nii.gz", organ_label((1, 6, 15)))
    write(src / "imagesVa" / "amos_0005.nii.gz", ct(5))
    write(src / "labelsVa" / "amos_0005.nii.gz", organ_label((14, 2)))
    write(src / "imagesTs" / "amos_0010.nii.gz", ct(10))
    write(src / "imagesTs" / "amos_0540.nii.gz", ct(11))
    return src


def fake_kits21(root: Path) -> Path:
    src = root / "kits21" / "data"
    for i in range(3):
        write(src / f"case_{i:05d}" / "imaging.nii.gz", ct(i))
        write(src / f"case_{i:05d}" / "aggregated_MAJ_seg.nii.gz", organ_label((1, 2, 3)))
    write(src / "case_00300" / "imaging.nii.gz", ct(7))  # test case: no label
    return src


COSMOS_SHAPE = (6, 16, 32)  # z, y, x; x >= 16 is the patient's left (LPS, identity direction)


def write_dicom_series(folder: Path, array: np.ndarray, spacing_xyz=(0.5, 0.5, 2.0)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing_xyz)
    uid = f"1.2.826.0.1.3680043.2.1125.1.{time.time_ns()}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(image.GetDepth()):
        sl = image[:, :, i]
        tags = {
            "0020|000e": uid,
            "0008|0018": f"{uid}.{i + 1}",
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, i)))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(i + 1),
            "0008|0060": "MR",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"IM{i + 1:04d}.dcm"))
        writer.Execute(sl)


def outline(cx: int, cy: int, r: int) -> list[tuple[int, int]]:
    """The closed pixel outline (x column, y row) of a (2r+1)^2 square, as CASCADE's dense contours."""
    top = [(cx + i, cy - r) for i in range(-r, r)]
    right = [(cx + r, cy + i) for i in range(-r, r)]
    bottom = [(cx - i, cy + r) for i in range(-r, r)]
    left = [(cx - r, cy - i) for i in range(-r, r)]
    return top + right + bottom + left


def qvs(slices: dict[int, tuple], shape=COSMOS_SHAPE) -> str:
    """QVAS XML as the 1st-place entry reads it: one QVAS_Image per slice (0-based order); {slice: (cx, cy)} ->
    lumen outline r=1 (3x3 px), outer wall r=3 (7x7 px), points on CASCADE's 512 x 512 grid."""
    nz, ny, nx = shape
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', "<QVAS_Project>"]
    for z in range(nz):
        parts.append(f'<QVAS_Image ImageName="E1S101I{z + 1}">')
        if z in slices:
            cx, cy = slices[z]
            for kind, r in (("Lumen", 1), ("Outer Wall", 3)):
                pts = "".join(
                    f'<Point x="{x * 512 / nx}" y="{y * 512 / ny}"/>' for x, y in outline(cx, cy, r)
                )
                parts.append(
                    f"<QVAS_Contour><Contour_Point>{pts}</Contour_Point><ContourType>{kind}</ContourType>"
                    "</QVAS_Contour>"
                )
        parts.append("</QVAS_Image>")
    parts.append("</QVAS_Project>")
    return "\n".join(parts)


def qvj(qvs_name: str, locations: dict[int, tuple], bifurcation: int | None = None) -> str:
    """A CASCADE project: its contour file and {Location Index: (IQ, AHAStatus)} relative to the bifurcation."""
    bif = (
        f'<BifurcationLocation><BifurcationImageIndex ImageIndex="{bifurcation}"/></BifurcationLocation>'
        if bifurcation is not None
        else ""
    )
    locs = "".join(
        f'<Location Index="{i}"><IQ>{iq}</IQ><AHAStatus>{aha}</AHAStatus></Location>'
        for i, (iq, aha) in locations.items()
    )
    return (
        f"<QVAS_Project><QVAS_Loaded_Series_List><QVASSeriesFileName>{qvs_name}</QVASSeriesFileName>"
        f"</QVAS_Loaded_Series_List><QVAS_System_Info>{bif}</QVAS_System_Info>"
        f"<Location_Property>{locs}</Location_Property></QVAS_Project>"
    )


def fake_cosmos(root: Path) -> Path:
    """Two labelled cases (left: slices 1 normal, 3 atherosclerotic, bifurcation at slice 2; right: slices 1 and 4,
    no bifurcation element, so slice = Index - 1) and a test case."""
    src = root / "cosmos"
    for case in ("c01", "c02"):
        write_dicom_series(src / case, np.arange(np.prod(COSMOS_SHAPE)).reshape(COSMOS_SHAPE) % 700)
        (src / case / "E1S101_L.QVS").write_text(qvs({1: (24, 8), 3: (25, 8)}))
        (src / case / f"{case}L.QVJ").write_text(qvj("E1S101_L.QVS", {-1: (2, 1), 1: (3, 4)}, bifurcation=2))
        (src / case / "E1S101_R.QVS").write_text(qvs({1: (7, 8), 4: (7, 9)}))
        (src / case / f"{case}R.QVJ").write_text(qvj("E1S101_R.QVS", {2: (2, 1), 4: (1, 4), 5: (2, 1)}))
    write_dicom_series(src / "t01", np.zeros(COSMOS_SHAPE))  # test case: no contours
    return src


def fake_mots(root: Path) -> Path:
    """DoDNet's folder names; LiTS originals (.nii) for liver, KiTS19 case folders for kidney, MSD for the rest."""
    src = root / "MOTS"
    shape = (4, 6, 6)
    lab2 = organ_label((1, 2), shape)
    for n in (0, 1):
        sitk.WriteImage(sitk.GetImageFromArray(ct(n, shape)), str(_mk(src / "0Liver" / f"volume-{n}.nii")))
        sitk.WriteImage(sitk.GetImageFromArray(lab2), str(_mk(src / "0Liver" / f"segmentation-{n}.nii")))
        case = src / "1Kidney" / "origin" / f"case_{n:05d}"
        write(case / "imaging.nii.gz", ct(n, shape))
        write(case / "segmentation.nii.gz", lab2)
    for folder, name, values in (
        ("2HepaticVessel", "hepaticvessel", (1, 2)),
        ("3Pancreas", "pancreas", (1, 2)),
        ("4Colon", "colon", (1,)),
        ("5Lung", "lung", (1,)),
        ("6Spleen", "spleen", (1,)),
    ):
        for n in (1, 2):
            write(src / folder / "imagesTr" / f"{name}_{n:03d}.nii.gz", ct(n, shape))
            write(src / folder / "labelsTr" / f"{name}_{n:03d}.nii.gz", organ_label(values, shape))
        write(src / folder / "imagesTs" / f"{name}_009.nii.gz", ct(9, shape))
    return src


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
