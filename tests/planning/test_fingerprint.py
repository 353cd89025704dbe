"""`nnunet-ext fingerprint`: nnU-Net's fingerprint with the ignore label out of the foreground statistics."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.commands import BIN, nnunet_env, run

from nnunet_ext.tools.phantoms import write_phantom_dataset


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprint")
    for sub in ("raw", "preprocessed", "results"):
        (root / sub).mkdir()
    small = dict(num_train=3, num_test=1, shape=(16, 40, 40), seed=1)
    write_phantom_dataset(root / "raw", 871, kind="full", name="Full", **small)
    write_phantom_dataset(root / "raw", 872, kind="sparse", name="Sparse", every=4, **small)
    return root


def fingerprint(root, name) -> dict:
    return json.loads((root / "preprocessed" / name / "dataset_fingerprint.json").read_text())


def test_without_ignore_label_it_reproduces_nnunets_statistics(workspace):
    """Our recomputation uses nnU-Net's own sampling: on a dataset without ignore label it gives nnU-Net's
    numbers (so on a sparse one the only difference is the ignore label)."""
    from nnunet_ext.planning.fingerprint import foreground_intensity_properties

    env = nnunet_env(workspace)
    run(["nnUNetv2_extract_fingerprint", "-d", "871", "-np", "1"], env)
    nnunet = fingerprint(workspace, "Dataset871_Full")["foreground_intensity_properties_per_channel"]["0"]
    raw = workspace / "raw" / "Dataset871_Full"
    ours = foreground_intensity_properties(raw, json.loads((raw / "dataset.json").read_text()), 1)["0"]
    assert ours == pytest.approx(nnunet, rel=1e-6)
    out = run(["nnunet-ext", "fingerprint", "-d", "871"], env)
    assert "no ignore label" in out.stdout
    assert not (
        workspace / "preprocessed" / "Dataset871_Full" / "dataset_fingerprint.with_ignore.json"
    ).exists()


def test_sparse_labels_get_the_dense_statistics_and_the_old_file_is_kept(workspace):
    env = nnunet_env(workspace)
    full = fingerprint(workspace, "Dataset871_Full")["foreground_intensity_properties_per_channel"]["0"]
    sparse_dir = workspace / "preprocessed" / "Dataset872_Sparse"

    missing = subprocess.run(
        [str(BIN / "nnunet-ext"), "fingerprint", "-d", "872", "--no-extract"],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert missing.returncode == 1 and "nnUNetv2_extract_fingerprint -d 872" in missing.stderr

    out = run(["nnunet-ext", "fingerprint", "-d", "872", "-np", "1"], env)  # extracts, then corrects
    before = json.loads((sparse_dir / "dataset_fingerprint.with_ignore.json").read_text())
    before = before["foreground_intensity_properties_per_channel"]["0"]
    after = fingerprint(workspace, "Dataset872_Sparse")
    stats = after["foreground_intensity_properties_per_channel"]["0"]
    # nnU-Net's own numbers are dominated by the unannotated slices (air included) ...
    assert before["percentile_00_5"] < -900 and before["mean"] < full["mean"] - 300
    # ... ours come from labelled voxels only: those of every 4th slice of the same phantoms
    assert abs(stats["mean"] - full["mean"]) < 0.2 * full["std"]
    assert abs(stats["percentile_00_5"] - full["percentile_00_5"]) < 0.5 * full["std"]
    assert abs(stats["percentile_99_5"] - full["percentile_99_5"]) < 0.5 * full["std"]
    assert (
        after["spacings"]
        == json.loads((sparse_dir / "dataset_fingerprint.with_ignore.json").read_text())["spacings"]
    )  # everything else untouched
    assert "foreground mean" in out.stdout

    again = run(["nnunet-ext", "fingerprint", "-d", "872"], env)
    assert "already excludes" in again.stdout
    assert fingerprint(workspace, "Dataset872_Sparse") == after

    # the planner reuses the corrected fingerprint (no --clean): its CT normalisation gets the new window
    run(["nnUNetv2_plan_experiment", "-d", "872"], env)
    plans = json.loads((sparse_dir / "nnUNetPlans.json").read_text())
    assert plans["foreground_intensity_properties_per_channel"]["0"] == pytest.approx(stats)
