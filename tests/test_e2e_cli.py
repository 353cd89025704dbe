"""End to end through the STOCK nnU-Net commands on a phantom with the tiny configuration.

nnUNetv2_plan_and_preprocess (fixture) -> nnUNetv2_train -tr <ours> -device cpu -> nnUNetv2_predict -tr <ours>
-> nnUNetv2_evaluate_folder. Every trainer nnunet_ext ships joins through its `_smoke` schedule variant, except
those in COVERED_ELSEWHERE (their stock-CLI path is run by another test).
"""

from __future__ import annotations

import json

import pytest
from support.commands import run, training_env

import nnunet_ext.trainers as ours

ALL_TRAINERS = ["nnUNetTrainer_smoke"] + [f"{t.__name__}_smoke" for t in ours.TRAINERS]
# Trainers whose stock-CLI path another test already runs, kept out of this (slow) loop: they change only the
# schedule or the split of a trainer tested here, or other tests train them with the stock commands.
COVERED_ELSEWHERE = {
    "nnUNetTrainerBANet_4fold_smoke": "nnUNetTrainerBANet (here) + the 4-fold split (test_banet.py::test_4fold_split)",
    "nnUNetTrainerLabelPropA_smoke": "nnUNetv2_train through `labelprop run` (test_labelprop.py, recipe test)",
    "nnUNetTrainerLabelPropB_smoke": "nnUNetv2_train through `labelprop run` (test_labelprop.py, recipe test)",
    "nnUNetTrainerUniSegFT_smoke": "plain nnUNetTrainer, UniSeg's downstream schedule; its -pretrained_weights "
    "loading in test_uniseg.py",
    "nnUNetTrainerMedSeqFTExpert_smoke": "the first stage of nnUNetTrainerMedSeqFT_smoke (here): trained, checkpointed "
    "and loaded inside that nnUNetv2_train",
    "nnUNetTrainerMedSeqFTNoExpert_smoke": "nnUNetTrainerMedSeqFT_smoke (here) with expert = None; trained without "
    "the expert in test_medseqft.py (the medseqft_noexpert strategy of the three-task sequence)",
}
TRAINERS = [t for t in ALL_TRAINERS if t not in COVERED_ELSEWHERE]


def test_every_shipped_trainer_is_covered_by_a_stock_cli_test():
    assert set(COVERED_ELSEWHERE) <= set(ALL_TRAINERS)
    assert set(TRAINERS) | set(COVERED_ELSEWHERE) == set(ALL_TRAINERS)
    assert issubclass(ours.nnUNetTrainerBANet_4fold_smoke, ours.nnUNetTrainerBANet)


def partially_labelled(trainer: str) -> bool:
    # the multi-task methods (DoDNet, TransDoDNet, UniSeg: trainers with the task registry) train on the partial
    # phantom; read from the class hierarchy, not from a test-only attribute
    from nnunet_ext.multitask.trainer import TaskRegistryTrainerMixin

    return issubclass(getattr(ours, trainer), TaskRegistryTrainerMixin)


def dataset_id_for(trainer: str) -> int:
    if partially_labelled(trainer):
        return 502
    # nnU-Net keeps ONE splits_final.json per dataset: trainers with their own fold count get their own dataset
    folds = getattr(getattr(ours, trainer), "num_folds", 5)
    return 501 if folds == 5 else 500 + folds * 10


def needs_pretrained_weights(trainer: str) -> bool:
    # fine-tuning trainers (LoRA, MedSeqFT) start from -pretrained_weights: nnUNetTrainer_smoke's checkpoint
    return getattr(getattr(ours, trainer), "needs_pretrained_weights", False)


def pretrained_checkpoint(workspace, dataset_id: int):
    """fold 0 checkpoint_final.pth of nnUNetTrainer_smoke on ``dataset_id`` (trained here if not yet)."""
    dataset = workspace.dataset(dataset_id)
    model = workspace.root / "results" / dataset.name / "nnUNetTrainer_smoke__nnUNetPlans__3d_tiny"
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    if not ckpt.is_file():
        cmd = [
            "nnUNetv2_train",
            str(dataset_id),
            "3d_tiny",
            "0",
            "-tr",
            "nnUNetTrainer_smoke",
            "-device",
            "cpu",
        ]
        run(cmd, training_env(workspace.env))
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_train_predict_evaluate_with_stock_cli(phantom_workspace, trainer):
    dataset_id = dataset_id_for(trainer)
    dataset = phantom_workspace.dataset(dataset_id, "partial" if partially_labelled(trainer) else "full")
    root, env = phantom_workspace.root, phantom_workspace.env
    extra = []
    if needs_pretrained_weights(trainer):
        ckpt = pretrained_checkpoint(phantom_workspace, dataset_id)
        extra = ["-pretrained_weights", str(ckpt)]
        if getattr(getattr(ours, trainer), "needs_mds_buffer", False):  # MedSeqFT: MDS buffer first
            select = [
                "nnunet-ext",
                "medseqft",
                "select",
                str(dataset_id),
                "3d_tiny",
                "--checkpoint",
                str(ckpt),
            ]
            run([*select, "-k", "2", "--views", "2", "--device", "cpu", "--overwrite"], env)
    run(
        ["nnUNetv2_train", str(dataset_id), "3d_tiny", "0", "-tr", trainer, "-device", "cpu", *extra],
        training_env(env),
    )
    model = root / "results" / dataset.name / f"{trainer}__nnUNetPlans__3d_tiny"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    cls = getattr(ours, trainer)
    if getattr(cls, "expert", None) is not None:  # MedSeqFT: its first stage, the expert, trained in this run
        expert = model.parent / model.name.replace(cls.__name__, cls.expert_trainer + "_smoke", 1)
        assert (expert / "fold_0" / "checkpoint_final.pth").is_file()
    assert (model / "fold_0" / "validation" / "summary.json").is_file()
    if partially_labelled(trainer):  # each validation case also scored on its own task's labels only
        per_task = json.loads((model / "fold_0" / "validation" / "summary_tasks.json").read_text())
        assert per_task["metric_per_case"] and per_task["mean"]
        for case in per_task["metric_per_case"]:
            assert case["case"].startswith(case["task"])

    out = root / "predictions" / trainer
    run(
        [
            "nnUNetv2_predict",
            "-i",
            str(dataset / "imagesTs"),
            "-o",
            str(out),
            "-d",
            str(dataset_id),
            "-c",
            "3d_tiny",
            "-f",
            "0",
            "-tr",
            trainer,
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
        ],
        env,
    )
    cases = sorted(p.name for p in (dataset / "labelsTs").glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == cases

    run(
        [
            "nnUNetv2_evaluate_folder",
            str(dataset / "labelsTs"),
            str(out),
            "-djfile",
            str(model / "dataset.json"),
            "-pfile",
            str(model / "plans.json"),
            "-np",
            "1",
        ],
        env,
    )
    summary = json.loads((out / "summary.json").read_text())
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    assert {str(v) for k, v in labels.items() if k != "background"} <= set(summary["mean"])
    for metrics in summary["mean"].values():
        assert (
            metrics["Dice"] != metrics["Dice"] or 0.0 <= metrics["Dice"] <= 1.0
        )  # NaN for empty, else [0, 1]
