"""Plan editing: derive, edit, tiny, presets, check; every bad input is refused and nothing is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from support.paths import DATA

from nnunet_ext.cli import main
from nnunet_ext.core.errors import UserError
from nnunet_ext.planning.plans import (
    add_configuration,
    apply_preset,
    check_configuration,
    descendants,
    edit_configuration,
    list_presets,
    resolve,
    tiny_configuration,
    validate,
)


@pytest.fixture
def plans() -> dict:
    return json.loads((DATA / "nnUNetPlans.json").read_text())


@pytest.fixture
def plans_dir(tmp_path) -> Path:
    """A copy of a real nnU-Net 2.8.1 plans file with its dataset.json, as in nnUNet_preprocessed."""
    folder = tmp_path / "Dataset001_Blob"
    folder.mkdir()
    shutil.copy(DATA / "nnUNetPlans.json", folder / "nnUNetPlans.json")
    shutil.copy(DATA / "dataset.json", folder / "dataset.json")
    return folder


def test_add_with_architecture_carries_the_whole_dict(plans):
    add_configuration(plans, "3d_resenc", "3d_fullres", arch="ResidualEncoderUNet")
    child = plans["configurations"]["3d_resenc"]
    assert child["inherits_from"] == "3d_fullres"
    arch = child["architecture"]
    # shallow merge: the child's architecture must be complete on its own
    assert set(arch) == set(plans["configurations"]["3d_fullres"]["architecture"])
    kw = arch["arch_kwargs"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    assert "n_blocks_per_stage" in kw and "n_conv_per_stage" not in kw
    assert kw["strides"] == plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    # nnU-Net itself resolves it to the same thing
    cm = PlansManager(plans).get_configuration("3d_resenc")
    assert cm.network_arch_class_name.endswith("ResidualEncoderUNet")
    assert cm.patch_size == plans["configurations"]["3d_fullres"]["patch_size"]


def test_add_refuses_existing_unless_forced(plans):
    with pytest.raises(UserError, match="already exists.*--force"):
        add_configuration(plans, "3d_fullres", "2d")
    add_configuration(plans, "x", "3d_fullres")
    add_configuration(plans, "x", "3d_fullres", arch="PlainConvUNet", force=True)


def test_add_rejects_unknown_parent_and_architecture(plans):
    with pytest.raises(UserError, match="'3d_nope' is not in the plans"):
        add_configuration(plans, "x", "3d_nope")
    with pytest.raises(UserError, match="unknown architecture 'Nope'"):
        add_configuration(plans, "x", "3d_fullres", arch="Nope")


def test_edit_validates_patch_against_strides(plans):
    # 3d_fullres strides multiply to [16, 32, 32]
    with pytest.raises(UserError, match="not divisible by the network's total stride.*--patch-size"):
        edit_configuration(plans, "3d_fullres", patch_size=[32, 60, 64])
    with pytest.raises(UserError, match="batch size must be >= 1"):
        edit_configuration(plans, "3d_fullres", batch_size=0)
    with pytest.raises(UserError, match="give 3 patch sizes"):
        edit_configuration(plans, "3d_fullres", patch_size=[32, 64])
    with pytest.raises(UserError, match="one value per stage"):
        edit_configuration(plans, "3d_fullres", features=[8, 16])
    with pytest.raises(UserError, match="positive"):
        edit_configuration(plans, "3d_fullres", spacing=[0, 1, 1])


def test_edit_of_inherited_configuration_materialises_architecture(plans):
    add_configuration(plans, "child", "3d_fullres")
    edit_configuration(plans, "child", base_features=16, max_features=128, batch_size=4)
    own = plans["configurations"]["child"]
    assert own["batch_size"] == 4
    assert own["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 128]
    assert "kernel_sizes" in own["architecture"]["arch_kwargs"]  # whole dict, not a fragment
    # parent untouched
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32


def test_n_stages_truncates_and_extends(plans):
    edit_configuration(plans, "3d_fullres", n_stages=3, patch_size=[32, 64, 64])
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 3 and len(kw["strides"]) == 3 and len(kw["n_conv_per_stage_decoder"]) == 2
    edit_configuration(plans, "3d_fullres", n_stages=4)
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 4 and len(kw["features_per_stage"]) == 4 and len(kw["kernel_sizes"]) == 4
    validate(plans, "3d_fullres")
    with pytest.raises(UserError, match="too small to downsample"):
        edit_configuration(plans, "3d_fullres", n_stages=9)


def test_spacing_change_gets_its_own_data_identifier(plans):
    add_configuration(plans, "coarse", "3d_fullres")
    edit_configuration(plans, "coarse", spacing=[3.0, 2.0, 2.0])
    assert resolve(plans, "coarse")["data_identifier"] != resolve(plans, "3d_fullres")["data_identifier"]


def test_tiny_is_small_valid_and_reuses_data(plans):
    name = tiny_configuration(plans)
    cfg = validate(plans, name)
    kw = cfg["architecture"]["arch_kwargs"]
    assert name == "3d_tiny" and kw["n_stages"] <= 4 and max(kw["features_per_stage"]) <= 64
    assert (
        cfg["batch_size"] == 2
        and cfg["patch_size"][0] * cfg["patch_size"][1] * cfg["patch_size"][2] <= 24 * 48 * 48
    )
    assert cfg["data_identifier"] == resolve(plans, "3d_fullres")["data_identifier"]
    name2d = tiny_configuration(plans, "2d")
    assert name2d == "2d_tiny" and len(validate(plans, name2d)["patch_size"]) == 2


def test_presets_list_and_apply(plans):
    presets = list_presets()
    assert {"tiny", "tiny_2d", "resenc"} <= set(presets)
    for name in presets:
        fresh = json.loads((DATA / "nnUNetPlans.json").read_text())
        apply_preset(fresh, name)
    with pytest.raises(UserError, match="unknown preset"):
        apply_preset(plans, "nope")
    with pytest.raises(UserError, match="unknown op"):
        apply_preset(plans, {"steps": [{"op": "explode"}]})


def test_check_reports_parameters_and_time(plans):
    tiny_configuration(plans)
    dataset_json = json.loads((DATA / "dataset.json").read_text())
    r = check_configuration(plans, dataset_json, "3d_tiny", device="cpu", iterations=1)
    assert r["parameters"] > 1000 and r["seconds_per_iteration"] > 0 and r["outputs"] == 3
    assert r["peak_memory_mb"] is None  # CPU


def test_check_reports_bad_class_and_kwargs_clearly(plans):
    dataset_json = json.loads((DATA / "dataset.json").read_text())
    tiny_configuration(plans)
    arch = plans["configurations"]["3d_tiny"]["architecture"]
    arch["network_class_name"] = "nnunet_ext.architectures.nope.Nope"
    with pytest.raises(UserError, match="cannot be imported.*network_class_name"):
        check_configuration(plans, dataset_json, "3d_tiny", device="cpu", iterations=1)
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    arch["arch_kwargs"]["bogus_kwarg"] = 1
    with pytest.raises(UserError, match="rejected the configuration's arch_kwargs.*bogus_kwarg"):
        check_configuration(plans, dataset_json, "3d_tiny", device="cpu", iterations=1)


# ---------------------------------------------------------------- through the CLI, on files
def test_cli_edits_back_up_and_write_atomically(plans_dir, capsys):
    plans_file = plans_dir / "nnUNetPlans.json"
    original = plans_file.read_text()
    assert main(["plans", "tiny", str(plans_file)]) == 0
    backups = list(plans_dir.glob("nnUNetPlans.json.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == original
    assert "3d_tiny" in json.loads(plans_file.read_text())["configurations"]
    assert not [p for p in plans_dir.iterdir() if ".tmp" in p.name]


def test_cli_bad_input_writes_nothing(plans_dir, capsys):
    plans_file = plans_dir / "nnUNetPlans.json"
    original = plans_file.read_text()
    assert main(["plans", "set", str(plans_file), "3d_fullres", "--batch-size", "0"]) == 1
    assert main(["plans", "set", str(plans_file), "3d_fullres", "--patch-size", "30", "64", "64"]) == 1
    assert main(["plans", "add", str(plans_file), "3d_fullres"]) == 1  # exists
    assert main(["plans", "set", str(plans_file), "nope", "--batch-size", "2"]) == 1
    assert main(["plans", "apply", str(plans_file), "nope"]) == 1
    err = capsys.readouterr().err
    assert "batch size must be >= 1" in err and "not divisible" in err and "--force" in err
    assert "'nope' is not in the plans" in err and "unknown preset" in err
    assert plans_file.read_text() == original
    assert not list(plans_dir.glob("*.bak-*"))


def test_cli_malformed_plans_file(tmp_path, capsys):
    bad = tmp_path / "nnUNetPlans.json"
    bad.write_text("{not json")
    assert main(["plans", "show", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_dataset_resolution_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert main(["plans", "show", "1"]) == 1
    assert "nnUNet_preprocessed is not set" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["plans", "show", "42"]) == 1
    assert "dataset '42' not found" in capsys.readouterr().err


def test_cli_show_and_check_by_dataset_id(plans_dir, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(plans_dir.parent))
    assert main(["plans", "show", "1"]) == 0
    assert "3d_fullres" in capsys.readouterr().out
    assert main(["plans", "tiny", "1"]) == 0
    assert main(["plans", "check", "1", "3d_tiny", "--device", "cpu", "--iterations", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["configuration"] == "3d_tiny"


def test_banet_presets_record_the_network_and_skip_missing_lowres(plans):
    report = apply_preset(plans, "banet_amos22")
    assert "3d_lowres_banet" not in plans["configurations"]  # these small plans have no 3d_lowres
    assert any("skipped" in line for line in report.lines)
    cfg = validate(plans, "3d_fullres_banet")
    assert cfg["architecture"]["network_class_name"] == "nnunet_ext.architectures.banet.BANet"
    # BANet accepts the parent's kwargs unchanged
    assert cfg["architecture"]["arch_kwargs"] == resolve(plans, "3d_fullres")["architecture"]["arch_kwargs"]
    fresh = json.loads((DATA / "nnUNetPlans.json").read_text())
    apply_preset(fresh, "banet_kipa22")
    assert {"3d_fullres_banet", "3d_fullres_resenc"} <= set(fresh["configurations"])


def test_banet_configuration_builds_through_nnunet(plans):
    """The dotted path in the plans resolves and nnU-Net's own builder makes a BA-Net from it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    apply_preset(plans, "banet_kipa22")
    tiny_configuration(plans, "3d_fullres_banet", "3d_tiny_banet")
    cm = PlansManager(plans).get_configuration("3d_tiny_banet")
    net = get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        1,
        3,
        deep_supervision=False,
    )
    assert type(net).__name__ == "BANet"


# ---------------------------------------------------------------- issue 17: what a refusal leaves possible
def _deep_child(plans: dict) -> None:
    """3d_deep: its own 6-stage network (total stride 32 per axis) on 3d_fullres's 32x64x64 patch."""
    arch = json.loads(json.dumps(plans["configurations"]["3d_fullres"]["architecture"]))
    arch["arch_kwargs"].update(
        n_stages=6,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
        kernel_sizes=[[3, 3, 3]] * 6,
        features_per_stage=[32, 64, 128, 256, 320, 320],
        n_conv_per_stage=[2] * 6,
        n_conv_per_stage_decoder=[2] * 5,
    )
    plans["configurations"]["3d_deep"] = {"inherits_from": "3d_fullres", "architecture": arch}


def test_descendants_and_a_parent_edit_that_breaks_a_child(plans):
    _deep_child(plans)
    add_configuration(plans, "grandchild", "3d_deep")
    assert descendants(plans, "3d_fullres") == ["3d_deep", "grandchild"]
    assert descendants(plans, "3d_deep") == ["grandchild"]
    validate(plans, "3d_deep")
    before = json.loads(json.dumps(plans))
    with pytest.raises(UserError, match="would break '3d_deep'"):
        edit_configuration(plans, "3d_fullres", patch_size=[32, 80, 80], n_stages=5)
    assert plans == before  # edits work on a copy: a refused edit changes nothing
    # the fix the message names: give the child its own values first, then edit the parent
    edit_configuration(plans, "3d_deep", patch_size=[32, 64, 64])
    edit_configuration(plans, "3d_fullres", patch_size=[32, 80, 80], n_stages=5)
    assert resolve(plans, "3d_fullres")["patch_size"] == [32, 80, 80]
    assert (
        validate(plans, "3d_deep")["patch_size"]
        == validate(plans, "grandchild")["patch_size"]
        == [32, 64, 64]
    )


def test_a_child_broken_before_the_edit_does_not_block_it(plans):
    plans["configurations"]["broken"] = {"inherits_from": "3d_fullres", "patch_size": [30, 64, 64]}
    with pytest.raises(UserError, match="not divisible"):
        validate(plans, "broken")
    edit_configuration(plans, "3d_fullres", batch_size=3)
    assert resolve(plans, "3d_fullres")["batch_size"] == 3


def test_refused_edits_leave_the_plans_unchanged(plans):
    before = json.loads(json.dumps(plans))
    with pytest.raises(UserError):
        tiny_configuration(plans, max_voxels=0)
    with pytest.raises(UserError):
        apply_preset(plans, {"steps": [{"op": "add", "name": "ok", "from": "3d_fullres"}, {"op": "explode"}]})
    with pytest.raises(UserError):
        add_configuration(plans, "", "3d_fullres")
    with pytest.raises(UserError, match="--force"):
        edit_configuration(plans, "3d_fullres", batch_size=2, patch_size=[4096, 4096, 4096])
    assert plans == before


def test_force_allows_deliberate_extremes(plans_dir, capsys):
    plans_file = plans_dir / "nnUNetPlans.json"
    argv = ["plans", "set", str(plans_file), "3d_fullres", "--patch-size", "1024", "1024", "1024"]
    assert main(argv) == 1
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["patch_size"] == [1024] * 3
    # non-finite and non-positive values stay refused even with --force
    assert main(["plans", "set", str(plans_file), "3d_fullres", "--spacing", "inf", "1", "1", "--force"]) == 1
    assert "Infinity" not in plans_file.read_text()


def test_read_only_plans_are_replaced_only_with_force_and_stay_read_only(plans_dir, capsys):
    plans_file = plans_dir / "nnUNetPlans.json"
    plans_file.chmod(0o444)
    original = plans_file.read_bytes()
    assert main(["plans", "set", str(plans_file), "3d_fullres", "--batch-size", "3"]) == 1
    assert "read-only" in capsys.readouterr().err and plans_file.read_bytes() == original
    assert main(["plans", "set", str(plans_file), "3d_fullres", "--batch-size", "3", "--force"]) == 0
    assert json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["batch_size"] == 3
    assert plans_file.stat().st_mode & 0o777 == 0o444
    (backup,) = plans_dir.glob("nnUNetPlans.json.bak-*")
    assert backup.read_bytes() == original


@pytest.mark.parametrize("mode", [0o644, 0o664, 0o640])
def test_a_shared_plans_file_keeps_its_mode(plans_dir, capsys, mode):
    plans_file = plans_dir / "nnUNetPlans.json"
    plans_file.chmod(mode)
    old_umask = os.umask(0o077)
    try:
        assert main(["plans", "tiny", str(plans_file)]) == 0
    finally:
        os.umask(old_umask)
    assert plans_file.stat().st_mode & 0o777 == mode
    assert "3d_tiny" in json.loads(plans_file.read_text())["configurations"]
