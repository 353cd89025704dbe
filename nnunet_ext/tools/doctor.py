"""``nnunet-ext doctor`` (are nnU-Net's env vars set, does nnU-Net find our trainers?) and ``nnunet-ext trainer-dir``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext import __version__, trainer_dir
from nnunet_ext.core.paths import EXT_TRAINER_VAR, NNUNET_FOLDERS


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _check_folder_var(name: str) -> Check:
    value = os.environ.get(name)
    if not value:
        return Check(name, False, "not set", f"export {name}=/path/to/folder ({NNUNET_FOLDERS[name]})")
    if not os.path.isdir(value):
        return Check(name, False, f"{value} does not exist", f"mkdir -p {value}")
    if not os.access(value, os.W_OK):
        return Check(name, False, f"{value} is not writable", f"fix the permissions of {value}")
    return Check(name, True, value)


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_ext_trainer() -> Check:
    ours = trainer_dir()
    fix = f"export {EXT_TRAINER_VAR}=$(nnunet-ext trainer-dir)   # = {ours}"
    value = os.environ.get(EXT_TRAINER_VAR)
    if not value:
        return Check(
            EXT_TRAINER_VAR, False, "not set: nnUNetv2_train/_predict will not find our trainers", fix
        )
    parts = [p for p in value.split(os.pathsep) if p.strip()]
    missing = [p for p in parts if not os.path.isdir(p)]
    if missing:
        return Check(EXT_TRAINER_VAR, False, f"folder(s) do not exist: {', '.join(missing)}", fix)
    if not any(_same_path(p, ours) for p in parts):
        package_trainers = Path(ours).parent.parent / "trainers"
        wrong = [
            p for p in parts if _same_path(p, str(package_trainers)) or p.rstrip("/").endswith("trainers")
        ]
        detail = f"{value} does not contain nnunet_ext's trainer folder"
        if wrong:
            detail += (
                f"; {wrong[0]} is a package folder: nnU-Net would import a SECOND copy of each class from it"
            )
        return Check(EXT_TRAINER_VAR, False, detail, fix)
    return Check(EXT_TRAINER_VAR, True, value)


def _check_trainer_lookup() -> Check:
    """Resolve every trainer we ship the way nnU-Net does and check it is OUR class object."""
    import nnunet_ext.trainers as ours

    if not os.environ.get(EXT_TRAINER_VAR):
        return Check("trainer lookup", False, f"skipped: {EXT_TRAINER_VAR} not set")
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    bad = []
    for name in ours.__all__:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                found = recursive_find_trainer_class_by_name(name)
        except Exception as e:  # nnU-Net raises RuntimeError/AssertionError
            bad.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        if found is not getattr(ours, name):
            bad.append(
                f"{name}: nnU-Net found {found.__module__}.{found.__qualname__}, a different class object"
            )
    if bad:
        return Check(
            "trainer lookup", False, "; ".join(bad), f"export {EXT_TRAINER_VAR}=$(nnunet-ext trainer-dir)"
        )
    return Check(
        "trainer lookup", True, f"{len(ours.__all__)} trainers found by nnU-Net: {', '.join(ours.__all__)}"
    )


def _versions() -> Check:
    from importlib.metadata import version

    import nnunetv2  # noqa: F401
    import torch

    cuda = (
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
        if torch.cuda.is_available()
        else "no GPU"
    )
    return Check(
        "versions",
        True,
        f"nnunet-ext {__version__}, nnunetv2 {version('nnunetv2')}, torch {torch.__version__} ({cuda}), "
        f"dynamic-network-architectures {version('dynamic_network_architectures')}",
    )


def run_doctor() -> list[Check]:
    checks = [_versions()]
    checks += [_check_folder_var(name) for name in NNUNET_FOLDERS]
    checks.append(_check_ext_trainer())
    checks.append(_check_trainer_lookup())
    return checks


def _doctor(args) -> int:
    checks = run_doctor()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"[{'ok' if c.ok else 'FAIL':>4}] {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            print(f"       {'':<{width}}  fix: {c.fix}")
    failed = [c for c in checks if not c.ok]
    print("all good" if not failed else f"{len(failed)} problem(s) found")
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trainer-dir",
        help="print the folder to put in nnUNet_extTrainer",
        description="Print the folder to put in nnUNet_extTrainer: export nnUNet_extTrainer=$(nnunet-ext trainer-dir)",
    )
    p.set_defaults(func=lambda args: print(trainer_dir()))
    p = sub.add_parser(
        "doctor",
        help="check nnU-Net's env vars, nnUNet_extTrainer and that nnU-Net finds our trainers",
        description="Check nnU-Net's env vars (nnUNet_raw, nnUNet_preprocessed, nnUNet_results), "
        "nnUNet_extTrainer, and that nnU-Net resolves every trainer we ship to our own class. "
        "Exits 1 if anything is wrong, printing the fix.",
    )
    p.set_defaults(func=_doctor)
