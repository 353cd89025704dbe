"""Raw nnU-Net datasets: reading images and label maps (SimpleITK, nibabel for what SimpleITK refuses), checking
their geometry and completeness, and the one writer of a new ``nnUNet_raw/DatasetXXX_NAME``.

:class:`RawDatasetWriter` builds the dataset in a hidden temp folder beside the target and swaps it into place
only when it is complete (:func:`replace_dataset`: an existing dataset with the same id is moved aside first
and deleted only after the new one is in place), with one id and name rule (:func:`check_dataset_id_and_name`).
Every command that writes a raw dataset (converters, phantoms, ``tasks merge``, ``uniseg merge``, ``labelprop``,
``medseqft phantoms``) goes through it.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.core.errors import UserError
from nnunet_ext.core.io import atomic_write_image, atomic_write_json, make_temp_dir

FILE_ENDING = ".nii.gz"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".mhd")


# ============================================================================================ reading
def _sitk():
    import SimpleITK as sitk

    return sitk


def strip_suffix(name: str) -> str:
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def is_image_file(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p) and not p.name.startswith("."))


def _geometry_sitk(path: Path):
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {
        "size": tuple(reader.GetSize()),
        "spacing": np.array(reader.GetSpacing()),
        "origin": np.array(reader.GetOrigin()),
        "direction": np.array(reader.GetDirection()),
    }


def _geometry_nibabel(path: Path):
    import nibabel

    img = nibabel.load(str(path))
    return {"size": tuple(img.shape[:3]), "affine": np.asarray(img.affine)}


def geometry_mismatch(image: Path, label: Path) -> str | None:
    """None if ``image`` and ``label`` share size, spacing, origin and direction; else what differs.

    SimpleITK reads the headers; files SimpleITK refuses (e.g. AMOS's non-orthonormal direction cosines)
    are compared through nibabel's affines instead."""
    try:
        a, b = _geometry_sitk(image), _geometry_sitk(label)
    except RuntimeError:
        try:
            a, b = _geometry_nibabel(image), _geometry_nibabel(label)
        except Exception as e:  # noqa: BLE001 - any reader failure is a problem of the case
            return f"cannot read the headers of {image.name} / {label.name}: {e}"
    diffs = []
    for key in a:
        va, vb = a[key], b[key]
        if key == "size":
            if va != vb:
                diffs.append(f"size {va} vs {vb}")
        elif not np.allclose(va, vb, rtol=1e-4, atol=1e-3):
            diffs.append(f"{key} {np.round(va, 4).tolist()} vs {np.round(vb, 4).tolist()}")
    return "; ".join(diffs) or None


def incomplete_image(path: Path) -> str | None:
    """None if the image file holds every voxel its header promises; else what is wrong. SimpleITK reads a
    truncated NIfTI without an error and fills the missing voxels with 0, so every NIfTI file is read to its end
    (decompressed) and its size compared with the header's; other formats are read fully by SimpleITK."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        try:
            _sitk().ReadImage(str(path))
        except RuntimeError as e:
            return f"{path.name} cannot be read: {str(e).strip().splitlines()[-1]}"
        return None
    import nibabel

    try:
        header = nibabel.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * int(
            header.get_data_dtype().itemsize
        )
    except Exception as e:  # noqa: BLE001 - any header problem is a problem of this file
        return f"{path.name} has no readable NIfTI header (truncated, or not a NIfTI file): {e}"
    size = 0
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"{path.name} is truncated or corrupt ({e})"
    if size < expected:
        return f"{path.name} is truncated: {size} bytes of the {expected} its header promises"
    return None


def read_label_array(path: Path) -> np.ndarray:
    try:
        return _sitk().GetArrayFromImage(_sitk().ReadImage(str(path)))
    except RuntimeError:
        import nibabel

        return np.asanyarray(nibabel.load(str(path)).dataobj)


def bad_label_values(array: np.ndarray, allowed: set[int]) -> list:
    values = np.unique(array)
    return [v.item() for v in values if v != np.round(v) or int(v) not in allowed]


@dataclass
class LabelVolume:
    """A label map as a (z, y, x) array with its spacing (z, y, x), and what is needed to write one like it."""

    array: np.ndarray
    spacing: tuple[float, ...]
    reference: object  # SimpleITK image, or nibabel image when SimpleITK cannot read the file
    reader: str  # "sitk" or "nibabel"

    def write_like(self, path: Path, array: np.ndarray) -> None:
        """Write ``array`` ((z, y, x), uint8) with this volume's geometry."""
        if self.reader == "sitk":
            write_label_like(path, array, self.reference)
            return
        import nibabel

        ref = self.reference
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(
            nibabel.Nifti1Image(np.asarray(array).transpose(2, 1, 0).astype(np.uint8), ref.affine, header),
            str(path),
        )


def read_label_volume(path: Path, reader: str | None = None) -> LabelVolume:
    """SimpleITK, or nibabel for files SimpleITK refuses (non-orthonormal direction cosines, as in AMOS);
    ``reader`` forces one. A truncated or corrupt file is refused (SimpleITK would read it as zeros)."""
    _refuse_incomplete(path)
    return _read_volume(path, reader)


def _refuse_incomplete(path: Path) -> None:
    problem = incomplete_image(path)
    if problem:
        raise UserError(
            f"{path} {problem.removeprefix(path.name + ' ')}; replace the file with a complete copy."
        )


def _read_volume(path: Path, reader: str | None = None) -> LabelVolume:
    if reader in (None, "sitk"):
        try:
            image = _sitk().ReadImage(str(path))
            spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
            return LabelVolume(_sitk().GetArrayFromImage(image), spacing, image, "sitk")
        except RuntimeError:
            if reader == "sitk":
                raise
    import nibabel

    image = nibabel.load(str(path))
    array = np.asanyarray(image.dataobj)
    if array.ndim != 3:
        raise UserError(f"{path} is not a 3D image (shape {array.shape}).")
    spacing = tuple(float(z) for z in reversed(image.header.get_zooms()[:3]))
    return LabelVolume(array.transpose(2, 1, 0), spacing, image, "nibabel")


def read_label_pair(a: Path, b: Path) -> tuple[LabelVolume, LabelVolume]:
    """Both files with the same reader (nibabel for both if SimpleITK refuses either); truncated or corrupt
    files are refused."""
    _refuse_incomplete(a)
    _refuse_incomplete(b)
    first = _read_volume(a)
    try:
        second = _read_volume(b, first.reader)
    except RuntimeError:
        return _read_volume(a, "nibabel"), _read_volume(b, "nibabel")
    return first, second


def write_label_like(path: Path, array: np.ndarray, reference) -> None:
    """Write a label array (uint8) with the geometry of the SimpleITK image ``reference``."""
    sitk = _sitk()
    out = sitk.GetImageFromArray(
        np.asarray(array).astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)
    )
    out.CopyInformation(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path), True)


# ============================================================================================ writing
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_dataset_id_and_name(dataset_id: int, name: str) -> None:
    """The one rule for the raw datasets we write (``DatasetXXX_NAME``): id 1..999, a name of letters, digits,
    '_' and '-' starting with a letter or digit (no spaces, dots or slashes: nnU-Net and shells must take it
    as one folder name)."""
    if not 1 <= int(dataset_id) <= 999:
        raise UserError(f"dataset id must be 1..999 (nnU-Net's DatasetXXX), got {dataset_id}.")
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise UserError(
            f"invalid dataset name {name!r}; use letters, digits, '_' and '-' (no spaces, dots or slashes), "
            f"e.g. MySparse."
        )


def existing_datasets_with_id(raw_root: str | os.PathLike, dataset_id: int) -> list[Path]:
    """Every ``raw_root/DatasetXXX_*`` folder with this id (nnU-Net ids must be unique)."""
    root = Path(raw_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())


def replace_dataset(tmp: str | os.PathLike, target: str | os.PathLike, dataset_id: int) -> Path:
    """Put a raw dataset written into the temp folder ``tmp`` (beside ``target``) in place: every existing
    dataset with ``dataset_id`` is moved aside, ``tmp`` is renamed to ``target``, then the old ones are
    deleted. Callers refuse to replace a dataset unless asked (``--force``) before they write ``tmp``."""
    tmp, target = Path(tmp), Path(target)
    moved: list[tuple[Path, Path]] = []  # (original place, where it waits)
    try:
        for old in existing_datasets_with_id(target.parent, dataset_id):
            aside = make_temp_dir(f".{old.name}.old-", target.parent)
            os.replace(old, aside / old.name)
            moved.append((old, aside))
        os.replace(tmp, target)
    except BaseException:  # the old datasets go back where they were; the caller removes tmp
        for old, aside in reversed(moved):
            if not old.exists():
                os.replace(aside / old.name, old)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    for _, aside in moved:
        shutil.rmtree(aside, ignore_errors=True)
    return target


class RawDatasetWriter:
    """The one writer of a new raw dataset ``raw_root/DatasetXXX_NAME``: every file goes into a hidden temp folder
    beside the target, and :meth:`finish` swaps the complete dataset into place (:func:`replace_dataset`).

    An existing dataset with the same id is refused unless ``force`` (the message names ``force_flag``), and never
    if it is one of ``protected`` (e.g. the sources of a merge). Used as a context manager, any exception before
    :meth:`finish` removes the temp folder (:meth:`abort`), so a failed or interrupted write leaves nothing and
    the old dataset untouched. Files are copied (``link=True``: hard-linked where possible, ``.nii.gz`` of the
    converters) or, through :meth:`add_file`, hard-linked or symlinked by the caller's choice."""

    def __init__(
        self,
        raw_root: Path,
        dataset_id: int,
        name: str,
        force: bool,
        link: bool = False,
        force_flag: str = "--force",
        protected: Iterable[str | os.PathLike] = (),
    ):
        check_dataset_id_and_name(dataset_id, name)
        self.raw_root = Path(raw_root).expanduser()
        if self.raw_root.exists() and not self.raw_root.is_dir():
            raise UserError(
                f"{self.raw_root} is a file, not a folder; pass a folder for the raw datasets (--out)."
            )
        self.id = int(dataset_id)
        self.name = name
        self.target = self.raw_root / f"Dataset{self.id:03d}_{name}"
        existing = existing_datasets_with_id(self.raw_root, self.id)
        kept = {Path(s).resolve() for s in protected}
        if any(p.resolve() in kept for p in existing):
            raise UserError(
                f"the output id {self.id} is one of the sources; choose another id (sources are never modified)."
            )
        if existing and not force:
            python = force_flag.lstrip("-").replace("-", "_")
            raise UserError(
                f"dataset id {self.id} already exists (nnU-Net ids must be unique): "
                f"{', '.join(str(p) for p in existing)}; pass {force_flag} to replace it ({python}=True from "
                f"Python), or choose another id."
            )
        # removed again by abort(), so a failure leaves nothing
        self.created_root = not self.raw_root.exists()
        self.raw_root.mkdir(parents=True, exist_ok=True)
        self.link = link
        self.tmp = make_temp_dir(f".{self.target.name}.tmp-", self.raw_root)
        self.files: dict[str, list[Path]] = {}
        self.group = ""
        self.finished = False

    def __enter__(self) -> RawDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.finished:
            self.abort()

    def path(self, sub: str, name: str, case_id: str = "") -> Path:
        """Where the new dataset's ``sub/name`` is written (inside the temp folder; ``sub`` is created). The
        file is recorded for ``case_id`` (:meth:`drop_case`); two writes of one name are refused."""
        return self._dst(case_id, sub, name)

    def add_file(self, src: Path, sub: str, name: str, how: str = "copy", case_id: str = "") -> Path:
        """``src`` as ``sub/name`` of the new dataset: ``how`` = ``copy`` (bytes and metadata), ``hardlink``
        (one file under two names; a copy where linking is impossible) or ``symlink`` (to ``src``'s absolute
        path)."""
        dst = self._dst(case_id, sub, name)
        try:
            if how == "symlink":
                os.symlink(Path(src).resolve(), dst)
                return dst
            if how == "hardlink":
                try:
                    os.link(src, dst)
                    return dst
                except OSError:
                    pass
            elif how != "copy":
                raise ValueError(f"how must be copy, hardlink or symlink, not {how!r}")
            shutil.copy2(src, dst)
        except OSError as e:
            if not Path(src).is_file():
                raise
            raise self._write_error(dst, e) from e
        return dst

    def write_array(
        self,
        array: np.ndarray,
        sub: str,
        name: str,
        spacing_zyx,
        origin=None,
        direction=None,
        case_id: str = "",
    ) -> Path:
        """A (z, y, x) array as the image ``sub/name`` (see :func:`nnunet_ext.core.io.atomic_write_image`)."""
        dst = self._dst(case_id, sub, name)
        try:
            return atomic_write_image(dst, array, spacing_zyx, origin, direction)
        except (RuntimeError, OSError) as e:
            raise self._write_error(dst, e) from e

    def begin_case(self, case_id: str) -> None:
        """Files written from now on belong to source case ``case_id`` (:meth:`drop_case` removes them)."""
        self.group = case_id

    def _dst(self, case_id: str, sub: str, name: str) -> Path:
        dst = self.tmp / sub / name
        try:
            dst.parent.mkdir(exist_ok=True)
        except OSError as e:
            raise self._write_error(dst.parent, e) from e
        if dst.exists():
            raise UserError(f"two source cases map to the same output file {sub}/{name}; rename one of them.")
        self.files.setdefault(self.group or case_id, []).append(dst)
        return dst

    def _write_error(self, dst: Path, error: Exception) -> UserError:
        """A failed write into the new dataset: never a problem of the source case, never skipped."""
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]
        return UserError(
            f"cannot write {dst.relative_to(self.tmp)} of the new dataset in {self.raw_root}: {reason}; nothing "
            f"was written (the partial dataset was removed). Free space on that disk or make it writable "
            f"(or pass another --out), then rerun."
        )

    def _copy(self, src: Path, dst: Path) -> None:
        low = src.name.lower()
        if low.endswith(".nii.gz") and self.link:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        if low.endswith((".nii.gz", ".nii")):  # a gzipped .nii is a valid .nii.gz
            self._copy_bytes(src, dst, compress=low.endswith(".nii"))
        else:
            image = _sitk().ReadImage(str(src))  # a read error is the source's problem
            self._write_sitk(image, dst)

    def _copy_bytes(self, src: Path, dst: Path, compress: bool) -> None:
        """Copy ``src`` to ``dst`` (gzipped if ``compress``); read errors propagate as they are (a problem of
        the source case), write errors become :meth:`_write_error`."""
        with open(src, "rb") as fi:
            try:
                fo = gzip.open(dst, "wb", compresslevel=1) if compress else open(dst, "wb")
            except OSError as e:
                raise self._write_error(dst, e) from e
            with fo:
                while chunk := fi.read(1 << 22):
                    try:
                        fo.write(chunk)
                    except OSError as e:
                        raise self._write_error(dst, e) from e
                try:
                    fo.flush()
                except OSError as e:
                    raise self._write_error(dst, e) from e

    def _write_sitk(self, image, dst: Path) -> None:
        try:
            _sitk().WriteImage(image, str(dst), True)
        except (RuntimeError, OSError) as e:
            raise self._write_error(dst, e) from e

    def copy_image(self, src: Path, case_id: str, channel: int, split: str = "Tr") -> None:
        self._copy(src, self._dst(case_id, f"images{split}", f"{case_id}_{channel:04d}{FILE_ENDING}"))

    def copy_label(self, src: Path, case_id: str, split: str = "Tr") -> None:
        self._copy(src, self._dst(case_id, f"labels{split}", f"{case_id}{FILE_ENDING}"))

    def write_image(self, image, case_id: str, channel: int, split: str = "Tr") -> None:
        dst = self._dst(case_id, f"images{split}", f"{case_id}_{channel:04d}{FILE_ENDING}")
        self._write_sitk(image, dst)

    def write_label(self, array: np.ndarray, reference, case_id: str, split: str = "Tr") -> None:
        dst = self._dst(case_id, f"labels{split}", f"{case_id}{FILE_ENDING}")
        try:
            write_label_like(dst, array, reference)
        except (RuntimeError, OSError) as e:
            raise self._write_error(dst, e) from e

    def drop_case(self, case_id: str) -> None:
        for p in self.files.pop(case_id, []):
            p.unlink(missing_ok=True)

    def finish(self, dataset_json: dict, extra_json: dict[str, object] | None = None) -> Path:
        """Write ``dataset.json`` (and ``extra_json``: file name -> JSON object, e.g. our metadata) and swap the
        dataset into place; the old dataset with this id goes only once the new one is there."""
        try:
            for file_name, obj in (extra_json or {}).items():
                atomic_write_json(self.tmp / file_name, obj)
            atomic_write_json(self.tmp / "dataset.json", dataset_json)
            target = replace_dataset(self.tmp, self.target, self.id)
        except OSError as e:
            raise self._write_error(self.tmp / "dataset.json", e) from e
        self.finished = True
        return target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created_root:
            try:
                self.raw_root.rmdir()
            except OSError:  # not empty: something else was put there meanwhile
                pass


def raw_root(out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    from nnunet_ext.core.paths import require_folder_var

    return require_folder_var("nnUNet_raw")
