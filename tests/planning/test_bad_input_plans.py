"""Bad input to `nnunet-ext plans` (issue 17 items 8, 10, 13): each case runs through the CLI and must end
with exit 1, one line on stderr naming the problem and the fix, no traceback, and the plans file and its
folder byte-identical (checksums and modes of the tree before and after)."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from support.paths import DATA

from nnunet_ext.cli import main

READ_ONLY = "is read-only (mode 0444); pass --force"
PLANS_FIX = "restore it from its backup (<file>.bak-*) or re-plan"
LIMIT_FIX = "beyond the limits that catch typos. Use a smaller value, or pass --force"
NAME_FIX = "is not allowed: use up to 100 letters, digits"


def tree(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
            p.stat().st_mode,
        )
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------------------ setups
def _plans(folder: Path) -> dict:
    return json.loads((folder / "nnUNetPlans.json").read_text())


def _save(folder: Path, plans) -> None:
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))


def deep_child(folder, monkeypatch=None):
    """3d_deep: its own 6-stage architecture (total stride 32 on every axis), 3d_fullres's patch 32x64x64."""
    plans = _plans(folder)
    arch = copy.deepcopy(plans["configurations"]["3d_fullres"]["architecture"])
    arch["arch_kwargs"].update(
        n_stages=6,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
        kernel_sizes=[[3, 3, 3]] * 6,
        features_per_stage=[32, 64, 128, 256, 320, 320],
        n_conv_per_stage=[2] * 6,
        n_conv_per_stage_decoder=[2] * 5,
    )
    plans["configurations"]["3d_deep"] = {"inherits_from": "3d_fullres", "architecture": arch}
    _save(folder, plans)


def small_patch_child(folder, monkeypatch=None):
    """3d_small: its own patch 8x16x16 (3d_fullres's total stride is 8x16x16), 3d_fullres's network."""
    plans = _plans(folder)
    plans["configurations"]["3d_small"] = {"inherits_from": "3d_fullres", "patch_size": [8, 16, 16]}
    _save(folder, plans)


def read_only(folder, monkeypatch=None):
    (folder / "nnUNetPlans.json").chmod(0o444)


def disk_full(folder, monkeypatch):
    import nnunet_ext.core.io

    def fail(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nnunet_ext.core.io, "atomic_write_json", fail)


def plans_bytes(data: bytes):
    def setup(folder, monkeypatch=None):
        (folder / "nnUNetPlans.json").write_bytes(data)

    return setup


def plans_json(obj):
    return plans_bytes(json.dumps(obj).encode())


def truncated_plans(folder, monkeypatch=None):
    path = folder / "nnUNetPlans.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def utf16_plans(folder, monkeypatch=None):
    path = folder / "nnUNetPlans.json"
    path.write_bytes(path.read_text().encode("utf-16"))


def bom_plans(folder, monkeypatch=None):
    path = folder / "nnUNetPlans.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def latin1_plans(folder, monkeypatch=None):
    plans = _plans(folder)
    plans["experiment_planner_used"] = "Planner für Bäume"
    (folder / "nnUNetPlans.json").write_bytes(json.dumps(plans, ensure_ascii=False).encode("latin-1"))


def config_edit(fn):
    def setup(folder, monkeypatch=None):
        plans = _plans(folder)
        fn(plans["configurations"])
        _save(folder, plans)

    return setup


def dataset_json_bytes(data: bytes):
    def setup(folder, monkeypatch=None):
        (folder / "dataset.json").write_bytes(data)

    return setup


def _set(key, value):
    def fn(configs):
        configs["3d_fullres"][key] = value

    return fn


def _set_kw(key, value):
    def fn(configs):
        configs["3d_fullres"]["architecture"]["arch_kwargs"][key] = value

    return fn


def none(folder, monkeypatch=None):
    pass


# (id, setup, arguments after the action with {P} for the plans file, fragments the one line must hold)
CHECK = ["check", "{P}", "3d_fullres", "--device", "cpu", "--iterations", "1"]
CASES = [
    # ---- item 8: an edit of a parent must not break a configuration inheriting from it
    (
        "parent-patch-breaks-deeper-child",
        deep_child,
        ["set", "{P}", "3d_fullres", "--patch-size", "32", "80", "80", "--n-stages", "5"],
        [
            "would break '3d_deep', which inherits from it",
            "total stride [32, 32, 32]",
            "Give '3d_deep' its own",
        ],
    ),
    (
        "parent-stages-break-child-patch",
        small_patch_child,
        ["set", "{P}", "3d_fullres", "--patch-size", "64", "128", "128", "--n-stages", "6"],
        ["would break '3d_small'", "Give '3d_small' its own values first"],
    ),
    (
        "replaced-parent-breaks-child",
        deep_child,
        ["add", "{P}", "3d_fullres", "--from", "2d", "--force"],
        ["would break '3d_deep'", "Give '3d_deep' its own values first"],
    ),
    # ---- item 8: non-finite and absurd values
    ("spacing-inf", none, ["set", "{P}", "3d_fullres", "--spacing", "inf", "1", "1"], ["3 finite positive"]),
    ("spacing-nan", none, ["set", "{P}", "3d_fullres", "--spacing", "nan", "1", "1"], ["3 finite positive"]),
    ("spacing-zero", none, ["set", "{P}", "3d_fullres", "--spacing", "0", "1", "1"], ["3 finite positive"]),
    ("spacing-count", none, ["set", "{P}", "3d_fullres", "--spacing", "1", "1"], ["3 finite positive"]),
    (
        "spacing-huge",
        none,
        ["set", "{P}", "3d_fullres", "--spacing", "1e9", "1", "1"],
        ["spacing", LIMIT_FIX],
    ),
    (
        "patch-4096-cubed",
        none,
        ["set", "{P}", "3d_fullres", "--patch-size", "4096", "4096", "4096"],
        ["exceeds 2048 voxels on an axis", LIMIT_FIX],
    ),
    (
        "patch-voxels",
        none,
        ["set", "{P}", "3d_fullres", "--patch-size", "1024", "1024", "1024"],
        ["more than 512^3", LIMIT_FIX],
    ),
    (
        "patch-zero",
        none,
        ["set", "{P}", "3d_fullres", "--patch-size", "0", "64", "64"],
        ["positive integers"],
    ),
    (
        "patch-not-divisible",
        none,
        ["set", "{P}", "3d_fullres", "--patch-size", "30", "64", "64"],
        ["not divisible", "Use e.g. --patch-size 32 64 64"],
    ),
    (
        "batch-1e8",
        none,
        ["set", "{P}", "3d_fullres", "--batch-size", "100000000"],
        ["exceeds 4096", LIMIT_FIX],
    ),
    (
        "batch-voxels",
        none,
        ["set", "{P}", "3d_fullres", "--batch-size", "4096", "--patch-size", "64", "128", "128"],
        ["voxels per batch", LIMIT_FIX],
    ),
    ("batch-zero", none, ["set", "{P}", "3d_fullres", "--batch-size", "0"], ["batch size must be >= 1"]),
    (
        "features-1e8",
        none,
        ["set", "{P}", "3d_fullres", "--features", "100000000", "64", "128", "256", "320"],
        ["exceeds 4096 features", LIMIT_FIX],
    ),
    (
        "features-zero",
        none,
        ["set", "{P}", "3d_fullres", "--features", "0", "64", "128", "256", "320"],
        ["--features must be positive integers"],
    ),
    (
        "base-features-above-cap",
        none,
        ["set", "{P}", "3d_fullres", "--base-features", "100000000"],
        ["exceeds the cap of 320", "lower --base-features or raise --max-features"],
    ),
    (
        "base-and-max-features-1e8",
        none,
        ["set", "{P}", "3d_fullres", "--base-features", "100000000", "--max-features", "100000000"],
        ["features", LIMIT_FIX],
    ),
    ("n-stages-zero", none, ["set", "{P}", "3d_fullres", "--n-stages", "0"], ["--n-stages must be >= 1"]),
    ("n-stages-100", none, ["set", "{P}", "3d_fullres", "--n-stages", "100"], ["Enlarge the patch first"]),
    ("nothing-to-change", none, ["set", "{P}", "3d_fullres"], ["give at least one of --patch-size"]),
    # ---- item 8: configuration names
    ("name-empty", none, ["add", "{P}", ""], ["configuration name ''", NAME_FIX]),
    ("name-blank", none, ["add", "{P}", " "], ["configuration name ' '", NAME_FIX]),
    ("name-slash", none, ["add", "{P}", "a/b"], ["'a/b'", NAME_FIX]),
    ("name-dots", none, ["add", "{P}", ".."], ["'..'", NAME_FIX]),
    ("name-double-underscore", none, ["add", "{P}", "x__y"], ["'x__y'", NAME_FIX]),
    ("tiny-name-empty", none, ["tiny", "{P}", "--name", ""], ["configuration name ''", NAME_FIX]),
    ("add-existing", none, ["add", "{P}", "3d_fullres"], ["already exists", "pass --force"]),
    ("add-unknown-parent", none, ["add", "{P}", "x", "--from", "3d_nope"], ["'3d_nope' is not in the plans"]),
    (
        "add-self-parent",
        none,
        ["add", "{P}", "x", "--from", "x"],
        ["cannot inherit from itself", "choose another name"],
    ),
    # ---- item 10: a read-only plans file, a failing write
    ("read-only-set", read_only, ["set", "{P}", "3d_fullres", "--batch-size", "3"], [READ_ONLY, "chmod u+w"]),
    ("read-only-add", read_only, ["add", "{P}", "child"], [READ_ONLY]),
    ("read-only-tiny", read_only, ["tiny", "{P}"], [READ_ONLY]),
    ("read-only-apply", read_only, ["apply", "{P}", "tiny"], [READ_ONLY]),
    (
        "disk-full",
        disk_full,
        ["tiny", "{P}"],
        ["cannot write", "No space left on device", "plans file is unchanged; free disk space"],
    ),
    # ---- item 13: plans JSON of the wrong type or encoding, truncated
    ("plans-list", plans_json([1, 2]), ["show", "{P}"], ["holds a JSON list", PLANS_FIX]),
    ("plans-string", plans_json("x"), ["tiny", "{P}"], ["holds a JSON str", PLANS_FIX]),
    (
        "configurations-list",
        plans_json({"configurations": []}),
        ["show", "{P}"],
        ["'configurations' is a list", PLANS_FIX],
    ),
    (
        "no-configurations",
        plans_json({"plans_name": "x"}),
        ["tiny", "{P}"],
        ["no 'configurations'", PLANS_FIX],
    ),
    (
        "configuration-string",
        config_edit(lambda c: c.__setitem__("3d_fullres", "x")),
        ["show", "{P}"],
        ["configuration '3d_fullres' is a string, not an object", PLANS_FIX],
    ),
    (
        "inherits-from-number",
        config_edit(lambda c: c["2d"].__setitem__("inherits_from", 5)),
        ["show", "{P}"],
        ["'inherits_from' of configuration '2d' is a number", PLANS_FIX],
    ),
    (
        "circular-inheritance",
        config_edit(
            lambda c: (c["2d"].__setitem__("inherits_from", "x"), c.__setitem__("x", {"inherits_from": "2d"}))
        ),
        ["set", "{P}", "2d", "--batch-size", "3"],
        ["circular inherits_from"],
    ),
    (
        "patch-size-string",
        config_edit(_set("patch_size", "x")),
        ["tiny", "{P}"],
        ["patch_size 'x' is not a list of integers", "restore the file from its backup"],
    ),
    (
        "batch-size-string",
        config_edit(_set("batch_size", "2")),
        ["set", "{P}", "3d_fullres", "--batch-size", "3"],
        ["batch_size '2' is not an integer", "restore the file from its backup"],
    ),
    (
        "spacing-infinity-in-file",
        config_edit(lambda c: c["3d_fullres"]["spacing"].__setitem__(0, float("inf"))),
        ["set", "{P}", "3d_fullres", "--batch-size", "3"],
        ["spacing [inf, ", "3 finite positive numbers"],
    ),
    (
        "arch-kwargs-list",
        config_edit(lambda c: c["3d_fullres"]["architecture"].__setitem__("arch_kwargs", [1])),
        ["add", "{P}", "child", "--arch", "ResidualEncoderUNet"],
        ["'arch_kwargs' (an object)", "restore the file from its backup"],
    ),
    (
        "strides-string",
        config_edit(_set_kw("strides", "2")),
        ["set", "{P}", "3d_fullres", "--n-stages", "3"],
        ["strides '2' is not a list of per-axis integer lists"],
    ),
    (
        "features-missing",
        config_edit(lambda c: c["3d_fullres"]["architecture"]["arch_kwargs"].pop("features_per_stage")),
        ["set", "{P}", "3d_fullres", "--base-features", "8"],
        ["has no per-stage lists (features_per_stage)", "U-Net kwargs only"],
    ),
    ("plans-utf16", utf16_plans, ["show", "{P}"], ["is not UTF-8 text", PLANS_FIX]),
    ("plans-latin1", latin1_plans, ["set", "{P}", "3d_fullres", "--batch-size", "3"], ["is not UTF-8 text"]),
    ("plans-bom", bom_plans, ["show", "{P}"], ["Unexpected UTF-8 BOM", PLANS_FIX]),
    ("plans-empty", plans_bytes(b""), ["show", "{P}"], ["is not valid JSON", PLANS_FIX]),
    ("truncated-show", truncated_plans, ["show", "{P}"], ["is not valid JSON", PLANS_FIX]),
    (
        "truncated-set",
        truncated_plans,
        ["set", "{P}", "3d_fullres", "--batch-size", "3"],
        ["is not valid JSON"],
    ),
    ("truncated-add", truncated_plans, ["add", "{P}", "child"], ["is not valid JSON", PLANS_FIX]),
    ("truncated-tiny", truncated_plans, ["tiny", "{P}"], ["is not valid JSON", PLANS_FIX]),
    ("truncated-apply", truncated_plans, ["apply", "{P}", "tiny"], ["is not valid JSON", PLANS_FIX]),
    ("truncated-check", truncated_plans, CHECK, ["is not valid JSON", PLANS_FIX]),
    ("missing-plans", none, ["show", "{D}/nnUNetPlansX.json"], ["does not exist"]),
    # ---- item 13: plans check counts, device, dataset.json
    (
        "check-batch-negative",
        none,
        [*CHECK, "--batch-size", "-1"],
        ["--batch-size: must be at least 1, got -1"],
    ),
    ("check-batch-zero", none, [*CHECK, "--batch-size", "0"], ["--batch-size: must be at least 1"]),
    ("check-batch-text", none, [*CHECK, "--batch-size", "abc"], ["'abc' is not a whole number"]),
    ("check-batch-1e8", none, [*CHECK, "--batch-size", "100000000"], ["exceeds 4096", LIMIT_FIX]),
    ("check-iterations-zero", none, [*CHECK[:-2], "--iterations", "0"], ["--iterations: must be at least 1"]),
    ("check-device-bad", none, [*CHECK[:-4], "--device", "gpu7"], ["'gpu7' is not a device; use auto, cpu"]),
    ("check-device-index", none, [*CHECK[:-4], "--device", "cuda:abc"], ["'cuda:abc' is not a device"]),
    ("check-unknown-configuration", none, ["check", "{P}", "3d_nope", "--device", "cpu"], ["Available: 2d"]),
    (
        "check-dataset-json-truncated",
        dataset_json_bytes((DATA / "dataset.json").read_bytes()[:40]),
        CHECK,
        ["dataset.json", "is not valid JSON", "copy it again from the dataset's folder in nnUNet_raw"],
    ),
    (
        "check-dataset-json-list",
        dataset_json_bytes(b"[1]"),
        CHECK,
        ["holds a JSON list", "copy it again from the dataset's folder"],
    ),
    (
        "check-dataset-json-utf16",
        dataset_json_bytes((DATA / "dataset.json").read_text().encode("utf-16")),
        CHECK,
        ["is not UTF-8 text", "copy it again"],
    ),
    (
        "check-dataset-json-keys",
        dataset_json_bytes(b'{"labels": {"background": 0}}'),
        CHECK,
        ["dataset.json is malformed", "it needs 'channel_names' and 'labels'"],
    ),
]


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse: bad argument values (one line, exit 1 by our Parser)
        return e.code


@pytest.mark.parametrize("setup, args, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plans_refuses_bad_input(tmp_path, capsys, monkeypatch, setup, args, fragments):
    folder = tmp_path / "Dataset001_Blob"
    folder.mkdir()
    shutil.copy(DATA / "nnUNetPlans.json", folder / "nnUNetPlans.json")
    shutil.copy(DATA / "dataset.json", folder / "dataset.json")
    setup(folder, monkeypatch)
    plans_file = folder / "nnUNetPlans.json"
    argv = ["plans", *(a.replace("{P}", str(plans_file)).replace("{D}", str(folder)) for a in args)]
    capsys.readouterr()
    before = tree(tmp_path)

    code = run(argv)

    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1, (code, captured.out, err)
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, err
    assert "error:" in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert tree(tmp_path) == before, "a refused plans command changed files"


def test_every_case_id_is_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
