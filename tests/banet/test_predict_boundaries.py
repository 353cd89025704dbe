"""`nnunet-ext predict-boundaries` on a BA-Net model trained with the stock CLI."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from support.commands import run, training_env

from nnunet_ext.cli import main


@pytest.fixture(scope="module")
def banet_model(phantom_workspace):
    dataset = phantom_workspace.dataset(501)
    model = (
        phantom_workspace.root / "results" / dataset.name / "nnUNetTrainerBANet_smoke__nnUNetPlans__3d_tiny"
    )
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        run(
            ["nnUNetv2_train", "501", "3d_tiny", "0", "-tr", "nnUNetTrainerBANet_smoke", "-device", "cpu"],
            training_env(phantom_workspace.env),
        )
    return dataset, model


@pytest.mark.slow
def test_boundary_maps_in_input_geometry(banet_model, phantom_workspace, monkeypatch, tmp_path, capsys):
    dataset, _ = banet_model
    for key, value in phantom_workspace.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    out = tmp_path / "boundaries"
    args = [
        "predict-boundaries",
        "-i",
        str(dataset / "imagesTs"),
        "-o",
        str(out),
        "-d",
        "501",
        "-c",
        "3d_tiny",
        "-tr",
        "nnUNetTrainerBANet_smoke",
        "-device",
        "cpu",
        "--disable_tta",
    ]
    assert main(args) == 0
    images = sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))
    maps = sorted(out.glob("*_boundary.nii.gz"))
    assert [m.name.replace("_boundary", "") for m in maps] == [i.name.replace("_0000", "") for i in images]
    for image_file, map_file in zip(images, maps):
        image, prob = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(map_file))
        assert prob.GetSize() == image.GetSize()
        assert np.allclose(prob.GetSpacing(), image.GetSpacing()) and np.allclose(
            prob.GetOrigin(), image.GetOrigin()
        )
        values = sitk.GetArrayFromImage(prob)
        assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0
    # refuses to overwrite unless --force
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.slow
def test_non_banet_model_is_refused(phantom_workspace, monkeypatch, tmp_path, capsys):
    dataset = phantom_workspace.dataset(501)
    model = phantom_workspace.root / "results" / dataset.name / "nnUNetTrainer_smoke__nnUNetPlans__3d_tiny"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        run(
            ["nnUNetv2_train", "501", "3d_tiny", "0", "-tr", "nnUNetTrainer_smoke", "-device", "cpu"],
            training_env(phantom_workspace.env),
        )
    monkeypatch.setenv("nnUNet_extTrainer", phantom_workspace.env["nnUNet_extTrainer"])
    code = main(
        [
            "predict-boundaries",
            "-i",
            str(dataset / "imagesTs"),
            "-o",
            str(tmp_path),
            "-m",
            str(model),
            "-device",
            "cpu",
        ]
    )
    assert code == 1
    assert "has no boundary decoder" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert (
        main(
            [
                "predict-boundaries",
                "-i",
                str(tmp_path),
                "-o",
                str(tmp_path / "o"),
                "-m",
                str(tmp_path / "nope"),
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
