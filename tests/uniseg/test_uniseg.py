"""UniSeg: prompt shapes, sliced loss, task-balanced sampler, all-task inference, fine-tuning conversion, trainer
and predictor on the multi-task phantom, mixed-modality merge. Tiny networks on CPU."""

from __future__ import annotations

import json
import os
from copy import deepcopy

import numpy as np
import pytest
import torch
from support.paths import DATA
from torch import nn

from nnunet_ext.architectures.uniseg import UniSeg, bottleneck_size
from nnunet_ext.uniseg.training import (
    SlicedDCCELoss,
    TaskBalancedDataLoader,
    local_label_table,
    to_local_targets,
)

torch.set_num_threads(2)

# the partial phantom's registry: liver [1, 2], kidney [3, 4], spleen [5]; K_t = 3, 3, 2; K = 3
TASK_LABELS = [[1, 2], [3, 4], [5]]


def arch_kwargs(n_stages=3, dim=3, strides=None, style="plain") -> dict:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    kw = dict(
        n_stages=n_stages,
        features_per_stage=[4, 8, 8, 8, 8, 8][:n_stages],
        conv_op=conv,
        kernel_sizes=[[3] * dim] * n_stages,
        strides=strides or [[1] * dim] + [[2] * dim] * (n_stages - 1),
        n_conv_per_stage_decoder=[1] * (n_stages - 1),
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    kw["n_conv_per_stage" if style == "plain" else "n_blocks_per_stage"] = [1] * n_stages
    return kw


def make_uniseg(ds=True, seed=0, input_channels=1, task_channels=None, patch=(8, 16, 16), **kw) -> UniSeg:
    torch.manual_seed(seed)
    net = UniSeg(
        input_channels,
        num_classes=6,
        deep_supervision=ds,
        task_labels=TASK_LABELS,
        patch_size=list(patch),
        task_channels=task_channels,
        **arch_kwargs(**kw),
    )
    net.apply(net.initialize)
    return net


# ------------------------------------------------------------------------------------------------ prompt
@pytest.mark.parametrize(
    "patch,strides,expected",
    [
        # the paper: 64x192x192, 5 poolings (last one in-plane only) -> (4, 6, 6)
        ((64, 192, 192), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (4, 6, 6)),
        ((8, 16, 16), [[1, 1, 1], [2, 2, 2], [2, 2, 2]], (2, 4, 4)),
        ((16, 32, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], (4, 4, 6)),
        ((32, 48), [[1, 1], [2, 2], [2, 2]], (8, 12)),
    ],
)
def test_prompt_shape_follows_patch_and_strides(patch, strides, expected):
    assert bottleneck_size(patch, strides) == expected
    if np.prod(patch) > 50000:  # the paper's size: the shape rule only (a forward pass is too slow on CPU)
        return
    net = make_uniseg(patch=patch, n_stages=len(strides), dim=len(patch), strides=strides)
    assert tuple(net.prompt.shape) == (1, 3, *expected)
    c = net.encoder.output_channels[-1]
    assert [m.conv.in_channels for m in net.fusion] == [c + 3, (c + 3) // 4, (c + 3) // 4]
    assert net.fusion[-1].conv.out_channels == 3
    assert net.decoder.transpconvs[0].in_channels == c + 1
    out = net(torch.randn(2, 1, *patch), torch.tensor([0, 2]))
    assert out[0].shape == (2, 3, *patch)


def test_prompt_shape_from_plans_through_the_trainer():
    """build_network_architecture derives the prompt from the configuration's patch size and strides."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.multitask.partial_labels import LAYOUT_KEY, TaskLayout
    from nnunet_ext.trainers import nnUNetTrainerUniSeg

    plans = json.loads((DATA / "nnUNetPlans.json").read_text())
    plans[LAYOUT_KEY] = TaskLayout(("a", "b"), ((1,), (2, 3)), 4).to_json()
    pm = PlansManager(plans)
    for cfg in ("3d_fullres", "2d"):
        if cfg not in plans["configurations"]:
            continue
        cm = pm.get_configuration(cfg)
        strides = cm.network_arch_init_kwargs["strides"]
        net = nnUNetTrainerUniSeg.build_network_architecture(pm, cm, 1, 4, True)
        assert tuple(net.prompt.shape) == (1, 2, *bottleneck_size(cm.patch_size, strides))
        assert net.num_outputs == 3  # max K_t = 1 + 2


# -------------------------------------------------------------------------------------------------- loss
def test_sliced_loss_equals_nnunet_loss_on_the_task_classes_and_ignores_the_rest():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    for batch_dice in (False, True):
        loss = SlicedDCCELoss([3, 3, 2], 3, batch_dice=batch_dice)
        ref = DC_and_CE_loss(
            {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            dice_class=MemoryEfficientSoftDiceLoss,
        )
        logits = torch.randn(2, 3, 6, 8, 8, requires_grad=True)
        target = torch.randint(0, 2, (2, 1, 6, 8, 8))
        spleen = torch.tensor([2, 2])
        value = loss(logits, target, spleen)
        torch.testing.assert_close(value, ref(logits[:, :2], target))
        value.backward()
        assert logits.grad[:, 2].abs().max() == 0  # channel beyond the spleen task's K = 2: no gradient
        assert logits.grad[:, :2].abs().max() > 0
        # whatever the extra channel holds, the loss does not change
        other = logits.detach().clone()
        other[:, 2] = 100.0
        torch.testing.assert_close(loss(other, target, spleen), value.detach())
        # a 3-class task uses all channels
        target3 = torch.randint(0, 3, (2, 1, 6, 8, 8))
        torch.testing.assert_close(loss(logits, target3, torch.tensor([0, 0])), ref(logits, target3))


def test_sliced_loss_with_ignore_label_and_mixed_tasks():
    torch.manual_seed(1)
    loss = SlicedDCCELoss([3, 3, 2], 3, ignore_label=7)
    logits = torch.randn(2, 3, 4, 6, 6)
    target = torch.randint(0, 2, (2, 1, 4, 6, 6))
    target[:, :, 0] = 7
    mixed = loss(logits, target, torch.tensor([0, 2]))
    assert torch.isfinite(mixed)
    changed = target.clone()
    changed[:, :, 0] = 0  # ignored voxels: their value does not matter ... but the logits there do not either
    logits2 = logits.clone()
    logits2[:, :, 0] = 50.0
    torch.testing.assert_close(loss(logits2, target, torch.tensor([0, 2])), mixed)


def test_local_targets_map_each_task_into_its_own_label_space():
    table = local_label_table(TASK_LABELS, 6, ignore_label=None)
    target = torch.tensor([0, 1, 2, 3, 4, 5]).view(1, 1, 6).repeat(3, 1, 1)
    local = to_local_targets(target, torch.tensor([0, 1, 2]), table)
    assert local[0, 0].tolist() == [0, 1, 2, 0, 0, 0]
    assert local[1, 0].tolist() == [0, 0, 0, 1, 2, 0]
    assert local[2, 0].tolist() == [0, 0, 0, 0, 0, 1]
    table = local_label_table(TASK_LABELS, 6, ignore_label=6)
    local = to_local_targets(torch.tensor([[[6, 5]]]), torch.tensor([2]), table)
    assert local.tolist() == [[[6, 1]]]


# ------------------------------------------------------------------------------------------------ sampler
def test_sampler_yields_single_task_batches_in_balanced_proportion():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    class Cases:  # what nnU-Net's data loader reads at construction: the identifiers
        identifiers = [f"liver_{i}" for i in range(7)] + [f"kidney_{i}" for i in range(2)] + ["spleen_0"]

    task_of = {k: ["liver", "kidney", "spleen"].index(k.split("_")[0]) for k in Cases.identifiers}
    lm = LabelManager({"background": 0, "a": 1}, None)
    dl = TaskBalancedDataLoader(Cases(), 2, (8, 8, 8), (8, 8, 8), lm, task_of_case=task_of)
    np.random.seed(0)
    counts = np.zeros(3, int)
    for _round in range(40):
        seen = []
        for _ in range(3):
            keys = dl.get_indices()
            tasks = {task_of[k] for k in keys}
            assert len(keys) == 2 and len(tasks) == 1  # single-task batch
            seen.append(tasks.pop())
        assert sorted(seen) == [0, 1, 2]  # every round: each task once
        counts += np.bincount(seen, minlength=3)
    assert counts.tolist() == [40, 40, 40]  # equal shares although liver has 7x the cases of spleen


# ------------------------------------------------------------------------------------------------ network
def test_task_ids_route_each_sample_and_reach_prompt_and_fusion():
    net = make_uniseg(ds=True)
    x = torch.randn(3, 1, 8, 16, 16)
    ids = torch.tensor([2, 0, 1])
    out = net(x, ids)
    assert [o.shape[1] for o in out] == [3, 3]
    for b in range(
        3
    ):  # per-sample routing = the sample alone with its task (instance norm: batch-independent)
        torch.testing.assert_close(net(x[b : b + 1], ids[b : b + 1])[0], out[0][b : b + 1])
    assert not torch.allclose(net(x[:1], torch.tensor([0]))[0], net(x[:1], torch.tensor([1]))[0])
    out[0].sum().backward()
    assert net.prompt.grad.abs().sum() > 0 and net.fusion[0].conv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(net(x)[0], net(x, torch.zeros(3, dtype=torch.long))[0])  # shape checks: task 0


def test_all_task_pass_equals_single_task_passes_and_merges_into_global_labels():
    net = make_uniseg(ds=False).eval()
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        local, _, _ = net.forward_tasks(x)  # (B, T, K, ...) from ONE batched decoder pass
        for t in range(3):
            torch.testing.assert_close(local[:, t], net(x, torch.tensor([t, t])), atol=1e-5, rtol=1e-5)
        u = net(x)  # what nnU-Net's predictor calls
        single = [net.forward_global(x, [t]).argmax(1) for t in range(3)]
    assert u.shape == (2, 6, 8, 16, 16)
    merged = u.argmax(1)
    for t, labs in enumerate(TASK_LABELS):
        # single-task map = the task's own argmax over its K_t classes, mapped to global labels
        own = local[:, t, : len(labs) + 1].argmax(1)
        expect = torch.tensor([0, *labs])[own]
        assert torch.equal(single[t], expect)
    stacked = torch.stack(single)
    assert torch.equal(merged == 0, (stacked == 0).all(0))  # background iff every task says background
    for t, labs in enumerate(TASK_LABELS):
        where = torch.isin(merged, torch.tensor(labs))
        assert torch.equal(stacked[t][where], merged[where])  # a label comes from the task that predicted it


def test_dynamo_traces_training_forward_without_graph_breaks():
    net = make_uniseg(ds=True)
    explanation = torch._dynamo.explain(net)(torch.randn(2, 1, 8, 16, 16), torch.tensor([1, 1]))
    assert explanation.graph_break_count == 0


def test_modality_groups_are_separate_first_convolutions():
    """Tasks with 1 and 2 channels: the stem has 1 + 2 input slots; a 1-channel sample only sees slot 0, a
    2-channel sample slots 1-2, i.e. its own kernels. In all-task mode the group follows the non-zero channels."""
    net = make_uniseg(ds=False, input_channels=2, task_channels=[1, 2, 1])
    assert net.group_channels == [1, 2] and net.task_group == [0, 1, 0]
    stem = net.encoder.stages[0][0].convs[0].conv
    assert stem.in_channels == 3
    x = torch.randn(1, 2, 8, 16, 16)
    x1 = x.clone()
    x1[:, 1] = 0
    scattered = net.stem_input(x1, torch.tensor([0]))
    assert torch.equal(scattered[:, 0], x1[:, 0]) and scattered[:, 1:].abs().max() == 0
    scattered = net.stem_input(x, torch.tensor([1]))
    assert scattered[:, 0].abs().max() == 0 and torch.equal(scattered[:, 1:], x)
    groups, has = net.detect_groups(torch.cat((x1, x, torch.zeros_like(x))))
    assert groups.tolist()[:2] == [0, 1] and has.tolist() == [True, True, False]
    net.eval()
    with torch.no_grad():
        u = net(torch.cat((x1, x)))
        u_short = net(x1[:, :1])  # a 1-channel input is zero-padded
    assert (u[0, 5] > -1).any() and (u[0, 3:5] == -1).all()  # 1-channel sample: liver + spleen tasks only
    assert (u[1, 3:5] > -1).any() and (u[1, 1:3] == -1).all() and (u[1, 5] == -1).all()  # kidney task only
    torch.testing.assert_close(u_short[0], u[0])


# ----------------------------------------------------------------------------------- fine-tuning conversion
@pytest.mark.parametrize("style", ["plain", "resenc"])
def test_converted_weights_load_strictly_into_a_plain_nnunet_and_into_banet(style):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    from nnunet_ext.architectures.banet import BANet
    from nnunet_ext.multitask.partial_labels import LAYOUT_KEY, TaskLayout
    from nnunet_ext.uniseg.commands import convert_state_dict
    from nnunet_ext.uniseg.training import UNISEG_KEY

    net = make_uniseg(ds=True, input_channels=2, task_channels=[1, 2, 1], style=style)
    plans = {
        LAYOUT_KEY: TaskLayout(("liver", "kidney", "spleen"), tuple(map(tuple, TASK_LABELS)), 6).to_json(),
        UNISEG_KEY: {"task_channels": [1, 2, 1]},
    }
    cls = PlainConvUNet if style == "plain" else ResidualEncoderUNet
    kw = arch_kwargs(style=style)
    for channels, group, slots in ((1, 0, [0]), (2, 1, [1, 2])):
        converted = convert_state_dict(net.state_dict(), plans, channels)
        assert not any(k == "prompt" or k.startswith("fusion.") for k in converted)
        target = cls(channels, num_classes=3, deep_supervision=True, **kw)
        target.load_state_dict(converted, strict=True)
        w = net.decoder.transpconvs[0].weight
        torch.testing.assert_close(target.decoder.transpconvs[0].weight, w[:-1])
        stem = (
            "encoder.stem.convs.0.conv.weight"
            if style == "resenc"
            else "encoder.stages.0.0.convs.0.conv.weight"
        )
        torch.testing.assert_close(converted[stem], net.state_dict()[stem][:, slots])
        # the same weights fine-tune a BA-Net: its encoder and segmentation decoder carry the plain U-Net's keys;
        # its boundary branch lives under `boundary.seg_layers.`, which nnU-Net's -pretrained_weights loader
        # neither requires nor transfers (so it starts from scratch, like the segmentation heads)
        banet = BANet(channels, num_classes=3, deep_supervision=True, **kw)
        result = banet.load_state_dict(converted, strict=False)
        assert not result.unexpected_keys
        assert result.missing_keys and all(k.startswith("boundary.seg_layers.") for k in result.missing_keys)
        torch.testing.assert_close(banet.decoder.transpconvs[0].weight, w[:-1])
        # the plain encoder computes exactly the UniSeg encoder of that modality group
        x = torch.randn(1, channels, 8, 16, 16)
        with torch.no_grad():
            ref = net.encoder(net.stem_input(net._pad_channels(x), torch.tensor([group])))
            got = target.encoder(x)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b)
    from nnunet_ext.core.errors import UserError

    with pytest.raises(UserError, match="modality groups"):
        convert_state_dict(net.state_dict(), plans, 4)


# ------------------------------------------------------------------------------------ trainer (stock nnU-Net)
def _trainer(workspace, dataset_id=502, kind="partial", cls_name="nnUNetTrainerUniSeg"):
    import nnunet_ext.trainers as ours

    dataset = workspace.dataset(dataset_id, kind)
    pre = workspace.root / "preprocessed" / dataset.name
    p = deepcopy(json.loads((pre / "nnUNetPlans.json").read_text()))
    p["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return getattr(ours, cls_name)(p, "3d_tiny", 0, dataset_json, device=torch.device("cpu"))


@pytest.fixture
def uniseg_env(phantom_workspace):
    with pytest.MonkeyPatch.context() as mp:
        for k in (
            "nnUNet_raw",
            "nnUNet_preprocessed",
            "nnUNet_results",
            "nnUNet_extTrainer",
            "nnUNet_compile",
        ):
            mp.setenv(k, phantom_workspace.env[k])
        mp.setenv("nnUNet_n_proc_DA", "0")
        yield phantom_workspace


@pytest.mark.slow  # plans + preprocesses the partial and full phantoms (shared with the e2e tests)
def test_trainer_predictor_task_prediction_and_fine_tuning(uniseg_env, tmp_path):
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from nnunet_ext.cli import main
    from nnunet_ext.multitask.predict import load_predictor, predict_tasks

    # the weights (and so the tie-free decisions the merge invariants below need) must not depend on which
    # tests ran before in this process: one seed for this test (torch: weights; numpy: nnU-Net's batch sampling)
    torch.manual_seed(0)
    np.random.seed(0)

    trainer = _trainer(uniseg_env)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    trainer.dataloader_train.data_loader.task_order = []  # start a fresh round (nnU-Net drew one batch already)
    tasks_seen = []
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    for _ in range(3):
        batch = next(trainer.dataloader_train)
        tasks_seen.append({k.split("_")[0] for k in batch["keys"]})
        assert np.isfinite(trainer.train_step(batch)["loss"])
    assert all(len(t) == 1 for t in tasks_seen)  # single-task batches ...
    present = {["liver", "kidney", "spleen"][t] for t in trainer.dataloader_train.data_loader.cases_by_task}
    assert len(present) >= 2  # the 5-fold split of 6 cases keeps at least two tasks in training
    assert set().union(*tasks_seen[: len(present)]) == present  # ... each task once per round
    after = trainer.network.state_dict()
    for key in (
        "prompt",
        "fusion.0.conv.weight",
        "decoder.transpconvs.0.weight",
        "encoder.stages.0.0.convs.0.conv.weight",
    ):
        assert not torch.equal(before[key], after[key]), key
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        val = trainer.validation_step(next(trainer.dataloader_val))
    assert np.isfinite(val["loss"]) and len(val["tp_hard"]) == 5
    # the official UniSeg_Trainer: 50 iterations per task per epoch
    assert trainer.num_iterations_per_epoch == 50 * 3

    out_base = trainer.output_folder_base
    os.makedirs(os.path.join(out_base, "fold_0"), exist_ok=True)
    with open(os.path.join(out_base, "plans.json"), "w") as f:
        json.dump(trainer.plans_manager.plans, f)
    with open(os.path.join(out_base, "dataset.json"), "w") as f:
        json.dump(trainer.dataset_json, f)
    ckpt = os.path.join(out_base, "fold_0", "checkpoint_final.pth")
    trainer.save_checkpoint(ckpt)

    # stock predictor: network(x) = all tasks merged into the global label space
    predictor = nnUNetPredictor(
        use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu")
    )
    predictor.initialize_from_trained_model_folder(out_base, (0,), "checkpoint_final.pth")
    assert isinstance(predictor.network, UniSeg)
    logits = predictor.predict_logits_from_preprocessed_data(torch.randn(1, 24, 48, 48))  # sets eval mode
    assert logits.shape == (6, 24, 48, 48) and torch.isfinite(logits).all()
    trainer.network.eval()
    trainer.set_deep_supervision_enabled(False)
    x = torch.randn(1, 1, 24, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(predictor.network(x), trainer.network(x))

    # nnunet-ext predict: all tasks vs --task vs --by-prefix on exported files
    images = uniseg_env.dataset(502, "partial") / "imagesTs"
    pred, layout = load_predictor(out_base, (0,), device="cpu", tta=False)
    maps = {}
    for mode in ("all", "liver", "kidney", "spleen", "prefix"):
        out = tmp_path / mode
        if mode == "all":
            predict_tasks(pred, layout, images, out, equal_weights=True)
        elif mode == "prefix":
            predict_tasks(pred, layout, images, out, by_prefix=True)
        else:
            predict_tasks(pred, layout, images, out, tasks=[mode])
        maps[mode] = {
            p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))
        }
    assert isinstance(pred.network, UniSeg)  # the task wrapper is removed again
    for case, merged in maps["all"].items():
        single = np.stack([maps[t][case] for t in ("liver", "kidney", "spleen")])
        for t, labs in enumerate(layout.labels):
            assert set(np.unique(single[t])) <= {0, *labs}
        assert np.array_equal(merged == 0, (single == 0).all(0))
        for t, labs in enumerate(layout.labels):
            where = np.isin(merged, labs)
            np.testing.assert_array_equal(single[t][where], merged[where])
        np.testing.assert_array_equal(maps["prefix"][case], maps[case.split("_")[0]][case])
    predict_tasks(pred, layout, images, tmp_path / "per_task", per_task=True)
    for t in layout.tasks:
        for case, own in maps[t].items():
            got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "per_task" / t / case)))
            np.testing.assert_array_equal(got, own)

    # own-task validation (the official UniSeg validate(): each case with its own task) + stored weights
    trainer.perform_actual_validation()
    val_dir = os.path.join(trainer.output_folder, "validation")
    own = json.load(open(os.path.join(val_dir, "summary_tasks.json")))
    assert own["metric_per_case"] and os.path.isfile(os.path.join(val_dir, "summary_tasks_merged.json"))
    for c in own["metric_per_case"]:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(val_dir, c["case"] + ".nii.gz")))
        assert set(np.unique(seg)) <= {0, *layout.labels[layout.task_index(c["task"])]}
    assert float(torch.load(ckpt, weights_only=False)["network_weights"]["merge_weights_set"]) == 1

    # fine-tuning: convert, then nnU-Net's -pretrained_weights loading into the plain trainer of another dataset
    converted = tmp_path / "uniseg_pretrained.pth"
    assert main(["uniseg", "convert-checkpoint", "-i", ckpt, "-o", str(converted)]) == 0
    assert (
        main(["uniseg", "convert-checkpoint", "-i", ckpt, "-o", str(converted)]) == 1
    )  # no silent overwrite
    src = trainer.network.state_dict()
    # the plain fine-tuning trainer and BA-Net (whose boundary branch, under .seg_layers., is not transferred)
    for name in ("nnUNetTrainerUniSegFT", "nnUNetTrainerBANet"):
        ft = _trainer(uniseg_env, 501, "full", name)
        if name == "nnUNetTrainerUniSegFT":
            assert ft.num_epochs == 100 and ft.num_iterations_per_epoch == 250
        ft.initialize()
        maybe_load_checkpoint(
            ft, continue_training=False, validation_only=False, pretrained_weights_file=str(converted)
        )
        for k, v in ft.network.state_dict().items():
            if ".seg_layers." in k:
                continue
            expect = src[k][:-1] if k.endswith("transpconvs.0.weight") else src[k]
            torch.testing.assert_close(v, expect, rtol=0, atol=0)


@pytest.mark.slow  # writes, merges, plans and preprocesses two tiny phantoms (~1 min)
def test_mixed_modality_merge_trains_and_predicts(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from support.commands import nnunet_env, run

    from nnunet_ext.tools.phantoms import write_phantom_dataset
    from nnunet_ext.uniseg.commands import merge_mixed_modalities

    raw = tmp_path / "raw"
    for sub in ("raw", "preprocessed", "results"):
        (tmp_path / sub).mkdir()
    ct = write_phantom_dataset(raw, 601, "full", num_train=3, num_test=1, shape=(16, 40, 40), seed=1)
    mm = write_phantom_dataset(raw, 602, "multimodal", num_train=3, num_test=1, shape=(16, 40, 40), seed=2)
    spec = {
        "tasks": {
            "organs": {
                "source": str(ct),
                "labels": {
                    "liver": "liver",
                    "kidney": "kidney",
                    "spleen": None,
                    "tumour": None,
                    "vessel": None,
                },
            },
            "spleenmm": {
                "source": str(mm),
                "labels": {
                    "spleen": "spleen",
                    "liver": None,
                    "kidney": None,
                    "tumour": "tumour",
                    "vessel": None,
                },
            },
        }
    }
    before = sorted(p.name for p in (ct / "imagesTr").iterdir())
    target = merge_mixed_modalities(spec, raw, 603, "Mixed")
    assert sorted(p.name for p in (ct / "imagesTr").iterdir()) == before  # sources untouched
    dj = json.loads((target / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT", "1": "mixed"}
    assert (
        dj["nnunet_ext_tasks"]["organs"]["channels"] == 1
        and dj["nnunet_ext_tasks"]["spleenmm"]["channels"] == 2
    )
    import SimpleITK as sitk

    pad = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "imagesTr" / "organs_phantom_000_0001.nii.gz")))
    assert pad.shape == (16, 40, 40) and not pad.any()
    from nnunet_ext.core.errors import UserError

    with pytest.raises(UserError, match="already exists"):
        merge_mixed_modalities(spec, raw, 603, "Mixed")

    env = nnunet_env(tmp_path)
    run(["nnUNetv2_plan_and_preprocess", "-d", "603", "-c", "3d_fullres", "-np", "1"], env)
    run(["nnunet-ext", "plans", "tiny", "603"], env)
    with pytest.MonkeyPatch.context() as mp:
        for k in (
            "nnUNet_raw",
            "nnUNet_preprocessed",
            "nnUNet_results",
            "nnUNet_extTrainer",
            "nnUNet_compile",
        ):
            mp.setenv(k, env[k])
        mp.setenv("nnUNet_n_proc_DA", "0")
        import nnunet_ext.trainers as ours

        pre = tmp_path / "preprocessed" / target.name
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False
        trainer = ours.nnUNetTrainerUniSeg(
            plans, "3d_tiny", 0, json.loads((pre / "dataset.json").read_text()), torch.device("cpu")
        )
        trainer.initialize()
        net = trainer.network
        assert net.group_channels == [1, 2] and net.task_group == [0, 1]
        trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
        trainer.on_train_epoch_start()
        stem = net.encoder.stages[0][0].convs[0].conv.weight
        trainer.dataloader_train.data_loader.task_order = []  # a fresh round: one batch of each task
        for _ in range(2):
            batch = next(trainer.dataloader_train)
            task = {k.split("_")[0] for k in batch["keys"]}
            assert len(task) == 1
            assert np.isfinite(trainer.train_step(batch)["loss"])
            grad = stem.grad.abs().flatten(2).amax((0, 2))  # per input slot of the first conv
            own = [0] if task == {"organs"} else [1, 2]
            assert all(grad[i] > 0 for i in own), (task, grad)
            assert all(grad[i] == 0 for i in range(3) if i not in own), (task, grad)  # other group's kernels
        out_base = trainer.output_folder_base
        os.makedirs(os.path.join(out_base, "fold_0"), exist_ok=True)
        json.dump(trainer.plans_manager.plans, open(os.path.join(out_base, "plans.json"), "w"))
        json.dump(trainer.dataset_json, open(os.path.join(out_base, "dataset.json"), "w"))
        trainer.save_checkpoint(os.path.join(out_base, "fold_0", "checkpoint_final.pth"))
        predictor = nnUNetPredictor(
            use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu")
        )
        predictor.initialize_from_trained_model_folder(out_base, (0,), "checkpoint_final.pth")
        # a CT-only case (one channel file) predicts with the 1-channel tasks; labels of the 2-channel task never
        imgs = target / "imagesTs"
        case = "organs_phantom_003"
        seg = predictor.predict_from_files(
            [[str(imgs / f"{case}_0000.nii.gz")]],
            None,
            save_probabilities=False,
            num_processes_preprocessing=1,
            num_processes_segmentation_export=1,
        )[0]
        spleen, tumour = dj["labels"]["spleen"], dj["labels"]["tumour"]
        assert seg.shape == (16, 40, 40) and not np.isin(seg, [spleen, tumour]).any()


# ----------------------------------------------------------------------------- fidelity / merge (issue 14)
def test_prompt_is_initialised_like_the_official_randn():
    torch.manual_seed(0)
    net = make_uniseg(ds=False)
    assert 0.7 < float(net.prompt.detach().std()) < 1.3  # torch.randn (std 1), not std 0.02


def test_trainer_iterations_are_50_per_task():
    from nnunet_ext.trainers import nnUNetTrainerUniSeg

    assert nnUNetTrainerUniSeg.iterations_per_task == 50


def test_batch_dice_pools_per_task_and_class():
    """Local class 1 of the liver task and of the spleen task are different structures: in a mixed batch the
    batch Dice is the mean over the (task, class) pairs, each pooled over its own samples only."""
    torch.manual_seed(0)
    loss = SlicedDCCELoss([3, 3, 2], 3, batch_dice=True, weight_ce=0.0)
    logits = torch.randn(4, 3, 4, 6, 6)
    target = torch.randint(0, 3, (4, 1, 4, 6, 6))
    target[2:] = target[2:].clamp_max(1)  # spleen samples: classes 0/1
    tasks = torch.tensor([0, 0, 2, 2])
    mixed = loss(logits, target, tasks)
    liver = loss(logits[:2], target[:2], tasks[:2])  # 2 pairs (classes 1, 2)
    spleen = loss(logits[2:], target[2:], tasks[2:])  # 1 pair (class 1)
    torch.testing.assert_close(mixed, (2 * liver + spleen) / 3)


def test_weighted_merge_keeps_an_undertrained_task_off_other_structures():
    """An under-trained spleen task fires everywhere with a large margin. With equal weights it takes the liver
    (the failure seen in the benchmark); with the stored own-task Dice weights the liver task keeps its voxel,
    through the stock forward (nnU-Net's predictor) and the exact decoding alike."""
    from nnunet_ext.multitask.predict import decode_scores

    net = make_uniseg(ds=False).eval()
    # (B, T, K, 1, 1, 1) probabilities: liver task says liver (0.7), kidney background, spleen says spleen (0.95)
    prob = torch.zeros(1, 3, 3, 1, 1, 1)
    prob[0, 0, :, 0, 0, 0] = torch.tensor([0.2, 0.7, 0.1])
    prob[0, 1, :, 0, 0, 0] = torch.tensor([0.9, 0.05, 0.05])
    prob[0, 2, :2, 0, 0, 0] = torch.tensor([0.05, 0.95])
    net.task_probabilities = lambda x, tasks=None: prob  # constructed head outputs
    x = torch.zeros(1, 1, 1, 1, 1)
    spleen = TASK_LABELS[2][0]
    liver = TASK_LABELS[0][0]
    scores = prob.reshape(1, 9, 1, 1, 1)[0]
    assert int(net(x).argmax(1).flatten()[0]) == spleen
    assert int(decode_scores(net, scores, "merged").flatten()[0]) == spleen
    w = torch.tensor([[0.9, 0.8], [0.9, 0.9], [0.1, 1.0]])
    net.set_merge_weights(w)
    assert net.has_merge_weights
    assert int(net(x).argmax(1).flatten()[0]) == liver
    assert int(decode_scores(net, scores, "merged", weights=w).flatten()[0]) == liver
    # a voxel no task claims is background; a structure only the liver task annotates is not lost to the others
    prob[0, 2, :2, 0, 0, 0] = torch.tensor([0.9, 0.1])
    assert int(decode_scores(net, scores, "merged", weights=w).flatten()[0]) == liver
    prob[0, 0, :, 0, 0, 0] = torch.tensor([0.8, 0.1, 0.1])
    assert int(decode_scores(net, scores, "merged", weights=w).flatten()[0]) == 0
    assert int(net(x).argmax(1).flatten()[0]) == 0
