"""Small file helpers shared by the package: atomic text / JSON / NIfTI writes, the ``--force`` check and
the swap of a newly written raw dataset into place.

Every write goes to a temporary file in the target's folder and is then moved into place with
``os.replace`` (atomic on one file system), so an interrupted run never leaves a half-written file under
the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_ext.core.errors import UserError

__all__ = [
    "atomic_write_image",
    "atomic_write_json",
    "atomic_write_text",
    "make_temp_dir",
    "new_file_mode",
    "read_json",
    "refuse_existing",
    "to_jsonable",
]


def to_jsonable(obj: Any) -> Any:
    """``json.dump`` ``default=`` hook: numpy scalars/arrays become Python numbers/lists, paths strings."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> int:
    """The permission bits a file written to ``path`` gets: those of the file it replaces, else what the
    umask gives a new file (``tempfile`` would make every file 0600 and every folder 0700)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def make_temp_dir(prefix: str, dir: str | os.PathLike) -> Path:
    """A new hidden temporary folder in ``dir`` with the umask's permissions (it becomes a dataset or output
    folder once renamed into place, so it must not stay 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    folder.chmod(0o777 & ~_umask())
    return folder


def _temp_path(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(
        prefix=f"{path.name[: -len(suffix)] if suffix else path.name}.tmp-", suffix=suffix, dir=path.parent
    )
    os.close(fd)
    os.chmod(name, new_file_mode(path))
    return Path(name)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, path.suffix)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj, path)`` atomically (a temporary file in the same folder, renamed into place)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, path.suffix)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (``indent=2``) to ``path`` atomically; numpy values are converted."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=to_jsonable) + "\n")


def read_json(path: str | os.PathLike, what: str = "", fix: str = "", expect: type = dict) -> Any:
    """The JSON in ``path``; a missing, truncated, non-UTF-8 or wrongly shaped file (top level not ``expect``) is
    a :class:`UserError` naming the file, the problem and ``fix`` (default: repair or regenerate the file)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    fix = fix or "repair the file or write it again"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{label} does not exist; {fix}.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{label} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}.") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{label} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}."
        ) from None
    if not isinstance(data, expect):
        raise UserError(
            f"{label} holds a JSON {type(data).__name__}, not the {expect.__name__} expected; {fix}."
        )
    return data


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz", ".nrrd", ".mha", ".mhd", ".nii"):
        if name.endswith(s):
            return path.name[-len(s) :]
    return path.suffix


def atomic_write_image(
    path: str | os.PathLike,
    array: np.ndarray,
    spacing_zyx: Sequence[float],
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
) -> Path:
    """Write a (z, y, x) numpy array as an image (NIfTI for ``.nii.gz``) with SimpleITK, atomically.

    ``spacing_zyx`` follows the array's axis order (z, y, x) and is reversed for SimpleITK, whose spacing is
    (x, y, z). ``origin`` and ``direction`` are physical-space values in SimpleITK's own order, exactly as
    ``image.GetOrigin()`` / ``image.GetDirection()`` return them (copy them from a reference image); the
    defaults are origin 0 and the identity direction. Boolean arrays are stored as uint8.
    """
    import SimpleITK as sitk

    path = Path(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if len(spacing_zyx) != array.ndim:
        raise ValueError(f"spacing_zyx has {len(spacing_zyx)} values but the array has {array.ndim} axes")
    image = sitk.GetImageFromArray(array)  # numpy (z, y, x) -> SimpleITK (x, y, z)
    image.SetSpacing([float(s) for s in reversed(tuple(spacing_zyx))])
    if origin is not None:
        image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, _image_suffix(path))  # keep the suffix: SimpleITK picks the writer from it
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def refuse_existing(path: str | os.PathLike, force: bool, what: str, flag: str = "--force") -> None:
    """Raise :class:`UserError` if ``path`` exists and ``force`` is false; ``flag`` is the command's own
    option for overwriting (named in the message)."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        python = flag.lstrip("-").replace("-", "_")
        raise UserError(
            f"{what} already exists: {path}; pass {flag} to overwrite it ({python}=True from Python), "
            f"or choose another destination."
        )
