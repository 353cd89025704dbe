"""Packaging: one class object per trainer, no generic top-level names, dotted paths resolve."""

from __future__ import annotations

import json
import os
import pydoc
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from support.paths import REPO

import nnunet_ext
import nnunet_ext.trainers as trainers
from nnunet_ext.architectures import ARCHITECTURES


def test_nnunet_finds_our_class_objects(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", nnunet_ext.trainer_dir())
    assert trainers.__all__, "no trainers exported"
    for name in trainers.__all__:
        found = recursive_find_trainer_class_by_name(name)
        assert found is getattr(trainers, name), f"{name}: nnU-Net found a second class object {found}"


def test_trainer_dir_holds_one_uniquely_named_module():
    entries = sorted(p.name for p in Path(nnunet_ext.trainer_dir()).iterdir() if p.name != "__pycache__")
    assert entries == ["nnunet_ext_trainers.py"]


def test_schedule_variants_are_short_and_subclass_their_trainer():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert issubclass(trainers.nnUNetTrainer_smoke, nnUNetTrainer)
    for base in trainers.TRAINERS:
        for schedule in ("smoke", "demo"):
            variant = getattr(trainers, f"{base.__name__}_{schedule}")
            assert variant.__mro__[1] is base


def test_architecture_dotted_paths_resolve():
    for spec in ARCHITECTURES.values():
        assert pydoc.locate(spec.network_class_name) is not None, spec.network_class_name


def test_console_script_trainer_dir():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "nnunet-ext"), "trainer-dir"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        check=True,
    ).stdout.strip()
    assert out == nnunet_ext.trainer_dir() and os.path.isdir(out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (like `pip install .` does) from a copy of the source, so the checkout stays clean."""
    import shutil

    src = tmp_path_factory.mktemp("src") / "nnunet_ext_src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", "nnunet_ext_demo", "benchmark_workdir"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    (out / "build.log").write_text(built.stdout + built.stderr, encoding="utf-8")
    return next(out.glob("nnunet_ext-*.whl"))


def test_wheel_build_prints_no_setuptools_package_warnings(wheel):
    log = (wheel.parent / "build.log").read_text(encoding="utf-8")
    for warning in (
        "Package would be ignored",
        "absent from the `packages` configuration",
        "BuildBackendWarning",
    ):
        assert warning not in log, f"`pip install .` warns: {warning}"


def test_wheel_installs_only_the_nnunet_ext_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"nnunet_ext", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    assert "nnunet_ext/trainer_dir/nnunet_ext_trainers.py" in names
    assert "nnunet_ext/presets/tiny.json" in names
    assert "nnunet_ext/trainers/__init__.py" in names and "nnunet_ext/architectures/__init__.py" in names


WITHOUT_EDITABLE_FINDER = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
)
PROBE = WITHOUT_EDITABLE_FINDER + (
    "import json, os, pydoc, nnunet_ext, nnunet_ext.trainers as t\n"
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
    "from nnunet_ext.architectures import ARCHITECTURES as A\n"
    "os.environ['nnUNet_extTrainer'] = nnunet_ext.trainer_dir()\n"
    "print(json.dumps({'file': nnunet_ext.__file__, 'trainers': t.__file__,\n"
    "  'same': all(f(n) is getattr(t, n) for n in t.__all__),\n"
    "  'archs': all(pydoc.locate(s.network_class_name) is not None for s in A.values())}))\n"
)


@pytest.fixture(scope="module")
def plain_site(wheel, tmp_path_factory) -> Path:
    """The wheel installed as `pip install .` does (not editable), into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def probe_plain_install(site: Path, cwd: Path) -> dict:
    """Import nnunet_ext in a fresh interpreter with only the plain install (no editable finder) from ``cwd``:
    where it and its trainers came from, whether nnU-Net's lookup returns those class objects and whether every
    architecture's dotted path resolves."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=dict(os.environ, PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_install_resolves_trainers_and_networks(plain_site, tmp_path):
    """`pip install .` (not editable): nnU-Net's lookup returns the installed package's class objects."""
    result = probe_plain_install(plain_site, tmp_path)
    assert result["file"].startswith(str(plain_site)), result
    assert result["same"] and result["archs"], result


def test_repository_root_imports_the_same_classes_as_a_plain_install(plain_site):
    """Issue 18 item 5: after a plain `pip install .`, Python started in the repository root imports the source
    nnunet_ext/ (it shadows the install); nnunet_ext.trainers must still import, and nnU-Net's lookup through
    nnUNet_extTrainer must return those same class objects."""
    result = probe_plain_install(plain_site, REPO)
    assert result["file"] == str(REPO / "nnunet_ext" / "__init__.py"), result
    assert result["trainers"] == str(REPO / "nnunet_ext" / "trainers" / "__init__.py"), result
    assert result["same"] and result["archs"], result


def test_source_namespace_links_are_the_top_level_folders():
    """Static tools (editors, type checkers) and Python started in the repository root find
    nnunet_ext.trainers / .architectures / .presets as files under nnunet_ext/: relative symlinks to the
    top-level folders, so there is one file per module."""
    for name, folder in (("trainers", "trainers"), ("architectures", "architectures"), ("presets", "plans")):
        link = REPO / "nnunet_ext" / name
        assert link.is_symlink() and os.readlink(link) == f"../{folder}", link
        assert (link / "__init__.py").resolve() == (REPO / folder / "__init__.py").resolve()


def test_find_trainer_looks_up_by_name_as_nnunet_does():
    """The library finds a trainer by name through nnU-Net's search of `nnunet-ext trainer-dir` (it never
    imports nnunet_ext.trainers itself) and gets the class objects nnUNetv2_train uses."""
    from nnunet_ext.core.errors import UserError
    from nnunet_ext.core.nnunet_commands import find_trainer

    for name in trainers.__all__:
        assert find_trainer(name) is getattr(trainers, name), name
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert find_trainer("nnUNetTrainer") is nnUNetTrainer
    with pytest.raises(UserError, match="nnUNetTrainerBANet, .*_converge.*Check the spelling"):
        find_trainer("nnUNetTrainerBANett")
