"""DoDNet: partial-label loss, dynamic heads, universal logits, trainer and predictor. Tiny networks on CPU."""

from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn

from nnunet_ext.architectures.dodnet import (
    DoDNet,
    apply_dynamic_heads,
    dynamic_head_layers,
    dynamic_head_num_params,
)
from nnunet_ext.architectures.transdodnet import TaskQueryTransformer, TransDoDNet
from nnunet_ext.core.train_step import call_with_tasks
from nnunet_ext.multitask.partial_labels import PartialLabelLoss, TaskLayout

torch.set_num_threads(2)

# the partial phantom's registry: liver [1, 2], kidney [3, 4], spleen [5]
LAYOUT = TaskLayout(("liver", "kidney", "spleen"), ((1, 2), (3, 4), (5,)), 6)


def arch_kwargs(style: str = "plain", dim: int = 3) -> dict:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    kw = dict(
        n_stages=3,
        features_per_stage=[4, 8, 8],
        conv_op=conv,
        kernel_sizes=[[3] * dim] * 3,
        strides=[[1] * dim] + [[2] * dim] * 2,
        n_conv_per_stage_decoder=[1, 1],
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    kw["n_conv_per_stage" if style == "plain" else "n_blocks_per_stage"] = [1, 1, 1]
    return kw


def make_dodnet(ds=True, seed=0, style="plain", dim=3, layout=LAYOUT) -> DoDNet:
    torch.manual_seed(seed)
    net = DoDNet(
        1,
        num_classes=layout.num_classes,
        deep_supervision=ds,
        task_labels=[list(v) for v in layout.labels],
        **arch_kwargs(style, dim),
    )
    net.apply(net.initialize)
    return net


def phantom_target(b=3, shape=(8, 12, 12), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (b, 1, *shape), generator=g)


# ------------------------------------------------------------------------------------------------------- loss
def test_loss_ignores_unannotated_structures():
    """Only the sample's own task channels enter the loss: any output on other tasks' heads (e.g. confidently
    predicting the kidney in a liver case, where the partial label says background) costs nothing."""
    loss_fn = PartialLabelLoss(LAYOUT)
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 8, 12, 12, requires_grad=True)
    target = phantom_target()
    task_ids = torch.tensor([0, 1, 2])
    loss = loss_fn(logits, target, task_ids)
    loss.backward()
    grad = logits.grad
    own = {0: [0, 1], 1: [2, 3], 2: [4]}  # channel 5 is the spleen task's padding channel
    for b, channels in own.items():
        for c in range(6):
            if c in channels:
                assert grad[b, c].abs().sum() > 0
            else:
                assert torch.count_nonzero(grad[b, c]) == 0, (b, c)
    # predicting kidney (task 1's channels) with certainty everywhere in the liver case changes nothing
    changed = logits.detach().clone()
    changed[0, 2:] = 50.0
    changed[2, 5] = -50.0  # padding channel of the spleen task
    assert torch.allclose(loss_fn(changed, target, task_ids), loss.detach())


def test_loss_formula_and_mixed_tasks():
    loss_fn = PartialLabelLoss(LAYOUT)
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 6, 6, 6)
    target = phantom_target(2, (6, 6, 6), seed=3)
    task_ids = torch.tensor([1, 2])
    terms = []
    for b, t in enumerate(task_ids.tolist()):
        for j, lab in enumerate(LAYOUT.labels[t]):
            z = logits[b, t * 2 + j]
            y = (target[b, 0] == lab).float()
            p = torch.sigmoid(z)
            dice = 2 * (p * y).sum() / (p.sum() + y.sum() + 1)
            terms.append(1 - dice + F.binary_cross_entropy_with_logits(z, y))
    assert len(terms) == 3  # kidney: kidney + kidney_tumour, spleen: spleen only
    torch.testing.assert_close(loss_fn(logits, target, task_ids), torch.stack(terms).mean())


def test_loss_ignore_label_and_deep_supervision():
    layout = TaskLayout(("all",), ((1, 2),), 3)
    loss_fn = PartialLabelLoss(layout, ignore_label=3)
    logits = torch.randn(1, 2, 4, 4, 4)
    target = torch.randint(0, 3, (1, 1, 4, 4, 4))
    base = loss_fn(logits, target, torch.tensor([0]))
    ignored = target.clone()
    ignored[..., :2] = 3
    changed = logits.clone()
    changed[..., :2] = 100.0
    # voxels with the ignore label do not count, whatever the network predicts there
    a = loss_fn(changed, ignored, torch.tensor([0]))
    b = loss_fn(logits, ignored, torch.tensor([0]))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base)
    ds = DeepSupervisionWrapper(loss_fn, [0.75, 0.25])
    low = logits[..., ::2, ::2, ::2]
    tgt_low = target[..., ::2, ::2, ::2]
    expected = 0.75 * base + 0.25 * loss_fn(low, tgt_low, torch.tensor([0]))
    torch.testing.assert_close(
        call_with_tasks(ds, [logits, low], [target, tgt_low], torch.tensor([0])), expected
    )


# -------------------------------------------------------------------------------------------- dynamic heads
def test_default_head_has_162_parameters():
    layers = dynamic_head_layers(8, 3, 2)
    assert layers == [(8, 8), (8, 8), (8, 2)]
    assert dynamic_head_num_params(layers) == 162
    net = make_dodnet()  # K = 2 (liver / kidney: organ + tumour)
    assert net.num_head_params == 162
    assert net.task_heads.seg_layers.controller.out_features == 162
    assert net.task_heads.seg_layers.controller.in_features == 8 + 3  # bottleneck channels + one-hot task


def test_grouped_conv_equals_per_sample_loop():
    torch.manual_seed(0)
    layers = dynamic_head_layers(8, 3, 2)
    feats = torch.randn(2, 8, 4, 5, 6)
    params = torch.randn(2, 3, 162)
    out = apply_dynamic_heads(feats, params, layers)
    assert out.shape == (2, 6, 4, 5, 6)
    torch.testing.assert_close(
        apply_dynamic_heads(feats, params, layers, impl="conv"), out, rtol=1e-5, atol=1e-5
    )
    for b in range(2):
        for t in range(3):
            p = params[b, t]
            w1, w2, w3 = (
                p[:64].view(8, 8, 1, 1, 1),
                p[64:128].view(8, 8, 1, 1, 1),
                p[128:144].view(2, 8, 1, 1, 1),
            )
            b1, b2, b3 = p[144:152], p[152:160], p[160:162]
            x = F.relu(F.conv3d(feats[b : b + 1], w1, b1))
            x = F.relu(F.conv3d(x, w2, b2))
            x = F.conv3d(x, w3, b3)
            torch.testing.assert_close(out[b : b + 1, t * 2 : t * 2 + 2], x, rtol=1e-5, atol=1e-5)


def test_per_sample_kernels_differ_by_task_and_sample():
    net = make_dodnet(ds=False)
    net.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        params = net.head_parameters(net.encoder(x))
    assert params.shape == (2, 3, 162)
    for b in range(2):
        for t in range(3):
            for u in range(t + 1, 3):
                assert not torch.allclose(params[b, t], params[b, u])
    assert not torch.allclose(params[0, 0], params[1, 0])  # conditioned on the image too
    # every task's output comes from its own kernels: same features, different maps per task
    with torch.no_grad():
        out = net.forward_tasks(x)
    assert out.shape == (2, 6, 16, 16, 16)
    assert not torch.allclose(out[:, 0:2], out[:, 2:4])


@pytest.mark.parametrize("style,dim", [("plain", 3), ("resenc", 3), ("plain", 2)])
def test_shapes_deep_supervision_and_modes(style, dim):
    net = make_dodnet(style=style, dim=dim)
    x = torch.randn(2, 1, *([16] * dim))
    net.train()
    out = net(x)
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (2, 6, *([16] * dim)) and out[1].shape == (2, 6, *([8] * dim))
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        u = net(x)
    assert u.shape == (2, 6, *([16] * dim))  # background + 5 labels: nnU-Net's output channels
    assert torch.all(u[:, 0] == 0)
    assert net.compute_conv_feature_map_size([16] * dim) > 0


def test_gradients_reach_backbone_and_controller():
    net = make_dodnet()
    net.train()
    out = net(torch.randn(2, 1, 16, 16, 16))
    loss = call_with_tasks(
        DeepSupervisionWrapper(PartialLabelLoss(LAYOUT), [0.7, 0.3]),
        out,
        [phantom_target(2, (16, 16, 16)), phantom_target(2, (8, 8, 8))],
        torch.tensor([0, 2]),
    )
    loss.backward()
    for prefix in ("encoder.", "decoder.stages.", "decoder.seg_layers.", "task_heads.seg_layers.controller."):
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0
            for n, p in net.named_parameters()
            if n.startswith(prefix)
        ), prefix


# ------------------------------------------------------------------------------------------ universal logits
def _decode(net: DoDNet, task_logits: torch.Tensor) -> torch.Tensor:
    return net.universal_logits(task_logits).argmax(1)


def test_universal_logits_threshold_and_tumour_over_organ():
    net = make_dodnet()
    big = 6.0  # sigmoid(6) ~ 0.998
    # one voxel per scenario, channels: liver, liver_tumour, kidney, kidney_tumour, spleen, (pad)
    scenarios = {
        "nothing": ([-big, -big, -big, -big, -big, 0], 0),
        "liver": ([big, -big, -big, -big, -big, 0], 1),
        "tumour over organ": ([big, 0.1, -big, -big, -big, 0], 2),  # tumour barely > 0.5 still wins
        "tumour alone": ([-big, 0.2, -big, -big, -big, 0], 2),
        "kidney tumour": ([-big, -big, big, big, -big, 0], 4),
        "higher prob across tasks": ([0.5, -big, 2.0, -big, -big, 0], 3),
        "spleen, padding ignored": ([-big, -big, -big, -big, 0.3, big], 5),
        "just below 0.5": ([-0.01, -0.01, -0.01, -0.01, -0.01, big], 0),
    }
    logits = torch.tensor([v for v, _ in scenarios.values()], dtype=torch.float32).T.reshape(1, 6, -1, 1, 1)
    got = _decode(net, logits).flatten().tolist()
    assert got == [e for _, e in scenarios.values()], dict(zip(scenarios, got))


def test_label_without_task_is_never_predicted():
    layout = TaskLayout(("a", "b"), ((1,), (3,)), 4)  # label 2 has no task
    net = make_dodnet(layout=layout)
    u = net.universal_logits(torch.full((1, 2, 2, 2, 2), 5.0))
    assert torch.all(u[:, 2] == -1.0) and torch.all(u.argmax(1) != 2)


def test_universal_prediction_is_union_of_single_task_predictions():
    """Universal = single-task predictions merged: background iff every task says background, otherwise the
    label of some task's own prediction (the one with the highest universal logit)."""
    net = make_dodnet(ds=False, seed=3)
    net.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        task_logits = net.forward_tasks(x)
        # spread the probabilities so that every label occurs somewhere
        task_logits = (task_logits - task_logits.mean((2, 3, 4), keepdim=True)) * 8
        universal = _decode(net, task_logits)
        single = []
        for t in range(3):
            net.set_inference_tasks([t])
            single.append(_decode(net, task_logits))
        net.set_inference_tasks(None)
        torch.testing.assert_close(_decode(net, task_logits), universal)
    single = torch.stack(single)  # (T, B, ...)
    for t, labs in enumerate(LAYOUT.labels):
        assert set(single[t].unique().tolist()) <= {0, *labs}
    assert torch.equal(universal == 0, (single == 0).all(0))
    task_of_label = {lab: t for t, labs in enumerate(LAYOUT.labels) for lab in labs}
    for lab, t in task_of_label.items():
        where = universal == lab
        assert torch.equal(single[t][where], universal[where])
    assert len(universal.unique()) == 6  # the check above covered every label
    # without cross-task conflicts the universal map IS the plain union
    no_conflict = (single > 0).sum(0) <= 1
    union = single.max(0).values
    assert torch.equal(universal[no_conflict], union[no_conflict])
    # and through the real forward (eval mode, single- vs all-task)
    with torch.no_grad():
        full = net(x).argmax(1)
        net.set_inference_tasks([1])
        kidney_only = net(x).argmax(1)
        net.set_inference_tasks(None)
    assert set(kidney_only.unique().tolist()) <= {0, 3, 4}
    assert torch.equal(kidney_only[(full == 3) | (full == 4)], full[(full == 3) | (full == 4)])


@pytest.mark.parametrize("kind", ["dodnet", "transdodnet"])
def test_own_task_heads_equal_the_own_task_channels_of_all_heads(kind):
    """Training passes task ids: only each sample's own head runs. Outputs, loss and gradients equal those of
    running every task's head and selecting each sample's channels."""
    net = (make_dodnet(ds=True) if kind == "dodnet" else make_transdodnet(max_tokens_per_level=64)).train()
    x = torch.randn(3, 1, 16, 16, 16)
    task_ids = torch.tensor([2, 0, 1])
    loss_fn = DeepSupervisionWrapper(PartialLabelLoss(LAYOUT), [0.7, 0.3])
    targets = [phantom_target(3, (16, 16, 16)), phantom_target(3, (8, 8, 8))]

    all_tasks = net(x)
    own = net(x, task_ids)
    assert [o.shape[1] for o in all_tasks] == [3 * 2] * 2 and [o.shape[1] for o in own] == [2] * 2
    for a, o in zip(all_tasks, own):
        torch.testing.assert_close(loss_fn.loss.select(a, task_ids), o)
    call_with_tasks(loss_fn, all_tasks, targets, task_ids).backward()
    grads_all = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    call_with_tasks(loss_fn, own, targets, task_ids).backward()
    grads_own = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads_all.keys() == grads_own.keys()
    for n in grads_all:
        torch.testing.assert_close(grads_own[n], grads_all[n], rtol=1e-4, atol=1e-6)

    net.eval()  # in eval mode task ids still give own-task logits; without them the universal logits
    with torch.no_grad():
        assert net(x, task_ids)[0].shape[1] == 2 and net(x)[0].shape[1] == LAYOUT.num_classes


def test_dynamo_traces_forward_without_side_channels():
    net = make_dodnet(ds=True)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x = torch.randn(1, 1, 16, 16, 16)
    net.train()
    for a, b in zip(net(x), compiled(x)):
        torch.testing.assert_close(a, b)
    task_ids = torch.tensor([1])
    for a, b in zip(net(x, task_ids), compiled(x, task_ids)):
        torch.testing.assert_close(a, b)
    net.eval()
    with torch.no_grad():
        for a, b in zip(net(x), compiled(x)):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ TransDoDNet
def make_transdodnet(ds=True, seed=0, **kw) -> TransDoDNet:
    torch.manual_seed(seed)
    net = TransDoDNet(
        1,
        num_classes=6,
        deep_supervision=ds,
        task_labels=[[1, 2], [3, 4], [5]],
        d_model=16,
        n_heads=2,
        n_enc_layers=1,
        n_dec_layers=2,
        **{**arch_kwargs(), **kw},
    )
    net.apply(net.initialize)
    return net


def test_transdodnet_queries_generate_per_task_heads():
    net = make_transdodnet(max_tokens_per_level=64)
    gen = net.task_heads.seg_layers
    assert isinstance(gen, TaskQueryTransformer) and gen.task_queries.shape == (3, 16)
    x = torch.randn(2, 1, 16, 16, 16)
    skips = net.encoder(x)
    assert gen.tokens(skips).shape == (2, 3 * 64, 16)  # levels 16^3, 8^3, 4^3 pooled to 4^3 tokens each
    params = net.head_parameters(skips)
    assert params.shape == (2, 3, 162)
    assert not torch.allclose(params[:, 0], params[:, 1])
    net.train()
    out = net(x)
    assert [o.shape[1] for o in out] == [6, 6]
    sum(o.sum() for o in out).backward()
    grads = {n: p.grad for n, p in gen.named_parameters()}
    for n in (
        "task_queries",
        "level_embed",
        "mlp.2.weight",
        "input_proj.0.weight",
        "encoder.layers.0.linear1.weight",
    ):
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert all(
        k.startswith("task_heads.seg_layers.") for k in net.state_dict() if "task_queries" in k or "mlp" in k
    )
    compiled = torch.compile(net, backend="eager")
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], net(x)[0])


def test_transdodnet_trainer_defaults_and_warmup_schedule():
    from nnunet_ext.core.schedules import PolyLRScheduler
    from nnunet_ext.trainers import nnUNetTrainerTransDoDNet

    assert nnUNetTrainerTransDoDNet.grad_clip == 0.1 and nnUNetTrainerTransDoDNet.warmup_epochs == 10
    kw = nnUNetTrainerTransDoDNet.network_extra_kwargs()
    assert (kw["d_model"], kw["n_heads"], kw["n_levels"], kw["n_enc_layers"], kw["n_dec_layers"]) == (
        192,
        8,
        3,
        3,
        3,
    )
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = PolyLRScheduler(opt, 1000, 10)
    lrs = []
    for epoch in (0, 4, 9, 10, 505, 999):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(2e-5) and lrs[1] == pytest.approx(1e-4) and lrs[2] == pytest.approx(2e-4)
    assert lrs[3] == pytest.approx(2e-4) and lrs[3] > lrs[4] > lrs[5] > 0


# ------------------------------------------------------------------------------------ trainer (stock nnU-Net)
def _partial_trainer(workspace, cls_name="nnUNetTrainerDoDNet", plans=None):
    import nnunet_ext.trainers as ours

    dataset = workspace.dataset(502, "partial")
    pre = workspace.root / "preprocessed" / dataset.name
    p = plans or json.loads((pre / "nnUNetPlans.json").read_text())
    p = deepcopy(p)
    p["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return getattr(ours, cls_name)(p, "3d_tiny", 0, dataset_json, device=torch.device("cpu"))


@pytest.fixture
def partial_env(phantom_workspace):
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


@pytest.mark.slow  # plans + preprocesses the partial phantom (shared with the e2e test)
@pytest.mark.parametrize("cls_name", ["nnUNetTrainerDoDNet", "nnUNetTrainerTransDoDNet"])
def test_trainer_step_validation_checkpoint_and_predictor(partial_env, tmp_path, cls_name):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ext.multitask.partial_labels import LAYOUT_KEY

    trainer = _partial_trainer(partial_env, cls_name)
    assert trainer.plans_manager.plans[LAYOUT_KEY]["labels"] == [[1, 2], [3, 4], [5]]
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    batch = next(trainer.dataloader_train)
    batch["keys"] = ["liver_000", "spleen_002"][: len(batch["keys"])]  # a mixed-task batch
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
    assert all(np.isfinite(losses))
    after = trainer.network.state_dict()
    for prefix in ("encoder.", "decoder.", "task_heads.seg_layers."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        val = trainer.validation_step(next(trainer.dataloader_val))
    assert np.isfinite(val["loss"]) and len(val["tp_hard"]) == 5

    # checkpoint -> stock predictor (plans.json of the results folder carries the task layout)
    out_base = trainer.output_folder_base
    os.makedirs(os.path.join(out_base, "fold_0"), exist_ok=True)
    with open(os.path.join(out_base, "plans.json"), "w") as f:
        json.dump(trainer.plans_manager.plans, f)
    with open(os.path.join(out_base, "dataset.json"), "w") as f:
        json.dump(trainer.dataset_json, f)
    trainer.save_checkpoint(os.path.join(out_base, "fold_0", "checkpoint_final.pth"))
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(out_base, (0,), "checkpoint_final.pth")
    assert isinstance(predictor.network, DoDNet)
    logits = predictor.predict_logits_from_preprocessed_data(torch.randn(1, 24, 48, 48))
    assert logits.shape == (6, 24, 48, 48) and torch.isfinite(logits).all()
    trainer.network.eval()
    trainer.set_deep_supervision_enabled(False)
    x = torch.randn(1, 1, 24, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(predictor.network(x), trainer.network(x))
    if cls_name != "nnUNetTrainerDoDNet":
        return
    # nnunet-ext predict: universal vs single-task predictions through nnU-Net's predictor and export
    import SimpleITK as sitk

    from nnunet_ext.core.errors import UserError
    from nnunet_ext.multitask.predict import load_predictor, predict_tasks

    images = partial_env.dataset(502, "partial") / "imagesTs"
    pred, layout = load_predictor(out_base, (0,), device="cpu", tta=False)
    with pytest.raises(UserError, match="no stored cross-task merge weights"):  # validation never ran
        predict_tasks(pred, layout, images, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    from nnunet_ext.cli import main

    cli = ["predict", "-i", str(images), "--model-folder", str(out_base), "-f", "0", "--device", "cpu"]
    assert main([*cli, "-o", str(tmp_path / "cli_refused"), "--disable-tta"]) == 1  # the same, exit 1
    assert not (tmp_path / "cli_refused").exists()
    maps = {}
    for mode in ("universal", "liver", "kidney", "spleen", "prefix"):
        out = tmp_path / mode
        if mode == "universal":
            predict_tasks(pred, layout, images, out, equal_weights=True)
        elif mode == "prefix":
            done = predict_tasks(pred, layout, images, out, by_prefix=True)
            assert done == {c: c.split("_")[0] for c in done}
        else:
            predict_tasks(pred, layout, images, out, tasks=[mode])
        maps[mode] = {
            p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))
        }
    for case, uni in maps["universal"].items():
        single = np.stack([maps[t][case] for t in ("liver", "kidney", "spleen")])
        for t, labs in enumerate(layout.labels):
            assert set(np.unique(single[t])) <= {0, *labs}
        assert np.array_equal(uni == 0, (single == 0).all(0))
        for t, labs in enumerate(layout.labels):
            where = np.isin(uni, labs)
            np.testing.assert_array_equal(single[t][where], uni[where])
        np.testing.assert_array_equal(maps["prefix"][case], maps[case.split("_")[0]][case])
    # one label map per task, nnU-Net's file names: each equals that task's own prediction
    predict_tasks(pred, layout, images, tmp_path / "per_task", per_task=True)
    for t in layout.tasks:
        for case, own in maps[t].items():
            np.testing.assert_array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "per_task" / t / case))), own
            )
    with pytest.raises(UserError, match="already exist"):
        predict_tasks(pred, layout, images, tmp_path / "per_task", per_task=True)

    # end-of-training validation: each case predicted with its own task; merged map scored separately; the
    # cross-task weights land in the checkpoint, after which the universal prediction needs no flag
    trainer.perform_actual_validation()
    val = Path(trainer.output_folder) / "validation"
    own = json.loads((val / "summary_tasks.json").read_text())
    merged = json.loads((val / "summary_tasks_merged.json").read_text())
    assert own["metric_per_case"] and merged["metric_per_case"] and (val / "summary.json").is_file()
    weights = json.loads((val / "merge_weights.json").read_text())["weights"]
    assert len(weights) == 3 and all(0.05 <= w <= 1 for row in weights for w in row)
    for c in own["metric_per_case"]:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(val / (c["case"] + ".nii.gz"))))
        assert set(np.unique(seg)) <= {0, *layout.labels[layout.task_index(c["task"])]}
        assert (Path(trainer.output_folder) / "validation_merged" / (c["case"] + ".nii.gz")).is_file()
    assert not (Path(trainer.output_folder) / ".validation_scores").exists()
    ckpt = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", weights_only=False)
    assert float(ckpt["network_weights"]["task_heads.seg_layers.merge_weights_set"]) == 1
    pred, layout = load_predictor(out_base, (0,), device="cpu", tta=False)
    predict_tasks(pred, layout, images, tmp_path / "weighted")
    assert json.loads((tmp_path / "weighted" / "nnunet_ext_predict.json").read_text())["merge_weights_stored"]


@pytest.mark.slow
def test_plain_nnunet_checkpoint_loads_as_pretrained_weights(partial_env, tmp_path):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dataset = partial_env.dataset(502, "partial")
    pre = partial_env.root / "preprocessed" / dataset.name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    plain = nnUNetTrainer(
        deepcopy(plans), "3d_tiny", 0, json.loads((pre / "dataset.json").read_text()), torch.device("cpu")
    )
    plain.initialize()
    ckpt = str(tmp_path / "plain.pth")
    plain.save_checkpoint(ckpt)
    trainer = _partial_trainer(partial_env)
    trainer.initialize()
    controller = trainer.network.task_heads.seg_layers.controller.weight.clone()
    maybe_load_checkpoint(
        trainer, continue_training=False, validation_only=False, pretrained_weights_file=ckpt
    )
    plain_sd = plain.network.state_dict()
    for k, v in trainer.network.state_dict().items():
        if ".seg_layers." not in k:
            torch.testing.assert_close(v, plain_sd[k], rtol=0, atol=0)
    torch.testing.assert_close(trainer.network.task_heads.seg_layers.controller.weight, controller)


def test_fully_labelled_dataset_is_one_task():
    layout, registry = TaskLayout.from_dataset_json(
        {"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}, "channel_names": {"0": "CT"}}
    )
    assert registry is None and layout.tasks == ("all",) and layout.labels == ((1, 2),)
    assert layout.num_classes == 3


def test_postprocessing_rules_from_registry():
    from nnunet_ext.multitask.predict import default_postprocessing_rules, postprocess_segmentation
    from nnunet_ext.tools.phantoms import PARTIAL_LABELS, PARTIAL_TASKS

    rules = default_postprocessing_rules({"labels": PARTIAL_LABELS, "nnunet_ext_tasks": PARTIAL_TASKS})
    assert rules["keep_largest"] == {1: 1, 3: 2, 5: 1} and rules["inside"] == {2: 1, 4: 3}
    seg = np.zeros((12, 12, 12), np.uint8)
    seg[1:7, 1:7, 1:7] = 1  # liver
    seg[3:6, 3:6, 3:6] = 2  # liver tumour inside (27 voxels >= min_size 10)
    seg[9:11, 9:11, 9:11] = 1  # second, smaller liver component: removed
    seg[9:11, 1:3, 9:11] = 2  # tumour outside the liver: removed
    seg[0, 11, 0] = 5  # a 1-voxel spleen: the largest spleen component, but below min_size
    out = postprocess_segmentation(seg, rules)
    assert (out[1:7, 1:7, 1:7] == seg[1:7, 1:7, 1:7]).all()
    assert not out[9:, :, :].any() and out[0, 11, 0] == 0


# ------------------------------------------------------------------------- cross-task merge (issue 14)
def _probs_to_logits(p: list[float]) -> torch.Tensor:
    """(1, T*K, 1, 1, 1) logits whose sigmoid is p (LAYOUT: liver, liver_tumour, kidney, kidney_tumour, spleen, pad)."""
    t = torch.tensor(p, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return torch.log(t / (1 - t)).float().view(1, -1, 1, 1, 1)


def _exact(net: DoDNet, p: list[float], weights=None) -> int:
    from nnunet_ext.multitask.predict import decode_scores

    scores = torch.tensor(p, dtype=torch.float32).view(-1, 1, 1, 1)
    return int(decode_scores(net, scores, "merged", weights=weights).flatten()[0])


def _stock(net: DoDNet, p: list[float]) -> int:
    return int(net.universal_logits(_probs_to_logits(p)).argmax(1).flatten()[0])


def test_merge_decides_inside_each_task_first():
    """The old rule compared the tumour-over-organ bonus across tasks: liver p = 0.99 lost to a kidney-tumour p of
    0.51 from the kidney task. Each task decides first, then the tasks are compared."""
    net = make_dodnet()
    case = [0.99, 0.01, 0.6, 0.51, 0.01, 0.0]  # liver task: liver; kidney task: its tumour, barely
    assert _stock(net, case) == 1 and _exact(net, case) == 1
    nothing = [0.2, 0.1, 0.4, 0.49, 0.3, 0.9]  # no task claims the voxel (padding channel never counts)
    assert _stock(net, nothing) == 0 and _exact(net, nothing) == 0
    # within the task the tumour still wins over its organ
    assert _stock(net, [0.99, 0.51, 0.01, 0.01, 0.01, 0.0]) == 2
    assert _exact(net, [0.99, 0.51, 0.01, 0.01, 0.01, 0.0]) == 2


def test_merge_never_loses_a_structure_to_a_task_that_does_not_annotate_it():
    net = make_dodnet()
    # the liver task claims liver weakly, the other tasks (which do not annotate liver) say background firmly
    weak = [0.55, 0.01, 0.001, 0.001, 0.001, 0.0]
    low = torch.full((3, 2), 1.0)
    low[0, 0] = 0.05  # even with the smallest weight
    assert _stock(net, weak) == 1 and _exact(net, weak) == 1 and _exact(net, weak, low) == 1
    net.set_merge_weights(low)
    assert _stock(net, weak) == 1


def test_merge_weights_stop_an_overconfident_task():
    """A task that fires everywhere (spleen p = 0.99 on a liver voxel) takes the voxel with equal weights; with the
    own-task validation Dice as weights (spleen 0.1, liver 0.9) the liver task keeps it."""
    from nnunet_ext.multitask.partial_labels import merge_task_decisions

    net = make_dodnet()
    case = [0.8, 0.01, 0.01, 0.01, 0.99, 0.0]
    assert _exact(net, case) == 5 and _stock(net, case) == 5
    w = torch.tensor([[0.9, 0.9], [1.0, 1.0], [0.1, 1.0]])
    assert _exact(net, case, w) == 1
    net.set_merge_weights(w)
    assert net.has_merge_weights and _stock(net, case) == 1
    # the helper on its own: decisions (B, T, ...) and margins
    choice = torch.tensor([[1, 0, 1]]).view(1, 3, 1)
    margin = torch.tensor([[0.6, 0.0, 0.98]]).view(1, 3, 1)
    assert int(merge_task_decisions(choice, margin, net.structure_labels, w)[0, 0]) == 1
    assert int(merge_task_decisions(choice, margin, net.structure_labels, torch.ones(3, 2))[0, 0]) == 5


def test_exact_decoding_averages_probabilities_before_thresholding():
    """Mirrors: tumour p 7 x 0.55 and 1 x 0.45 (mean 0.5375 > 0.5: DoDNet says tumour), organ p 0.99. The exact
    decoding (mean sigmoid, then threshold) gives the tumour; nnU-Net's averaging of the stock logits does not."""
    from nnunet_ext.multitask.predict import decode_scores

    net = make_dodnet()
    mirrors = [[0.99, 0.55, 0.01, 0.01, 0.01, 0.0]] * 7 + [[0.99, 0.45, 0.01, 0.01, 0.01, 0.0]]
    mean_p = torch.tensor(mirrors).mean(0).view(-1, 1, 1, 1)
    assert int(decode_scores(net, mean_p, "own", 0).flatten()[0]) == 2
    assert int(decode_scores(net, mean_p, "merged").flatten()[0]) == 2
    stock = torch.stack([net.universal_logits(_probs_to_logits(m)) for m in mirrors]).mean(0)
    assert int(stock.argmax(1).flatten()[0]) == 1  # the documented approximation of the stock path


def test_merge_weights_travel_in_the_state_dict_and_old_checkpoints_load():
    from nnunet_ext.multitask.partial_labels import merge_weights_from_summary

    net = make_dodnet()
    sd = net.state_dict()
    assert "task_heads.seg_layers.merge_weights" in sd and "task_heads.seg_layers.merge_weights_set" in sd
    old = {k: v for k, v in sd.items() if "merge_weights" not in k}
    other = make_dodnet(seed=1)
    other.set_merge_weights(torch.full((3, 2), 0.5))
    other.load_state_dict(old)  # strict: the missing buffers get equal weights, flag not set
    assert not other.has_merge_weights and torch.all(other.merge_weights == 1)
    summary = {
        "metric_per_case": [
            {
                "case": "liver_0",
                "task": "liver",
                "metrics": {"1": {"Dice": 0.8}, "2": {"Dice": float("nan")}},
            },
            {"case": "liver_1", "task": "liver", "metrics": {"1": {"Dice": 0.6}, "2": {"Dice": 0.0}}},
            {"case": "spleen_0", "task": "spleen", "metrics": {"5": {"Dice": 0.3}}},
        ]
    }
    weights, _ = merge_weights_from_summary(summary, LAYOUT)
    assert weights == [[pytest.approx(0.7), 0.05], [1.0, 1.0], [pytest.approx(0.3), 1.0]]


def test_nested_targets_cover_the_inner_labels():
    nested = TaskLayout(("liver", "kidney", "spleen"), ((1, 2), (3, 4), (5,)), 6, (True, False, False))
    table = nested.target_table()
    assert table[0, 0].nonzero().flatten().tolist() == [1, 2] and table[
        0, 1
    ].nonzero().flatten().tolist() == [2]
    assert table[1, 0].nonzero().flatten().tolist() == [3]
    assert nested.scoring_regions("liver") == [(1, 2), 2] and nested.scoring_regions("kidney") == [3, 4]
    assert TaskLayout.from_json(nested.to_json()) == nested
    target = torch.tensor([0, 1, 2, 3, 4]).view(1, 1, 5, 1, 1).repeat(2, 1, 1, 1, 1)
    logits = torch.zeros(2, 2, 5, 1, 1)
    logits[:, 0] = 20 * ((target[:, 0] == 1) | (target[:, 0] == 2)).float() - 10  # organ = organ + tumour
    logits[:, 1] = 20 * (target[:, 0] == 2).float() - 10
    ids = torch.tensor([0, 0])
    nested_loss = float(PartialLabelLoss(nested)(logits, target, ids))  # only the Dice smoothing is left
    assert nested_loss < 0.3 and float(PartialLabelLoss(LAYOUT)(logits, target, ids)) > nested_loss + 0.5
    with pytest.raises(ValueError, match="nested"):
        TaskLayout(("a",), ((1,),), 2, (True,))


# ------------------------------------------------------------------------------- TransDoDNet fidelity
def test_transdodnet_token_pooling_only_on_oversized_axes():
    gen = make_transdodnet(max_tokens_per_level=300).task_heads.seg_layers
    shapes = gen.token_shapes([(16, 24, 24), (8, 12, 12), (8, 6, 6)])
    assert [g for _, g in shapes] == [(8, 6, 6), (8, 6, 6), (8, 6, 6)]  # never coarser than the bottleneck
    assert shapes[1][0] == (1, 2, 2) and shapes[2][0] == (1, 1, 1)
    gen.max_tokens_per_level = 64
    assert [g for _, g in gen.token_shapes([(16, 16, 16)])] == [(4, 4, 4)]


def test_transdodnet_adds_the_transformer_memory_to_the_bottleneck():
    net = make_transdodnet(ds=False, max_tokens_per_level=64).train()
    gen = net.task_heads.seg_layers
    assert gen.memory_proj is not None
    x = torch.randn(2, 1, 16, 16, 16)
    skips = net.encoder(x)
    params, new = net.heads_and_skips(skips)
    assert params.shape == (2, 3, 162) and new[-1].shape == skips[-1].shape
    assert not torch.allclose(new[-1], skips[-1]) and all(a is b for a, b in zip(new[:-1], skips[:-1]))
    net(x).sum().backward()
    assert gen.memory_proj[0].weight.grad is not None and gen.memory_proj[0].weight.grad.abs().sum() > 0
    plain = make_transdodnet(ds=False, max_tokens_per_level=64, add_memory=False)
    assert plain.task_heads.seg_layers.memory_proj is None
    s = plain.encoder(x)
    assert plain.heads_and_skips(s)[1][-1] is s[-1]
