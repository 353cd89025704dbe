"""BA-Net: network (nnunet_ext.architectures.banet), loss, trainers and pretrained loading. Tiny networks on CPU."""

from __future__ import annotations

import json
import os
from copy import deepcopy

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_ext.architectures.banet import BANet
from nnunet_ext.banet.loss import BoundaryAwareLoss
from nnunet_ext.core.errors import UserError

torch.set_num_threads(2)


def arch_kwargs(dim: int = 3, style: str = "plain", n_stages: int = 3) -> dict:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    kw = dict(
        n_stages=n_stages,
        features_per_stage=[4, 8, 8, 8][:n_stages],
        conv_op=conv,
        kernel_sizes=[[3] * dim] * n_stages,
        strides=[[1] * dim] + [[2] * dim] * (n_stages - 1),
        n_conv_per_stage_decoder=[1] * (n_stages - 1),
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    if style == "plain":
        kw["n_conv_per_stage"] = [1] * n_stages
    else:
        kw["n_blocks_per_stage"] = [1] * n_stages
    return kw


def make_banet(dim=3, style="plain", ds=True, num_classes=3, seed=0, n_stages=3) -> BANet:
    torch.manual_seed(seed)
    net = BANet(1, num_classes=num_classes, deep_supervision=ds, **arch_kwargs(dim, style, n_stages))
    net.apply(net.initialize)
    return net


def make_reference(dim=3, style="plain", ds=True, num_classes=3, seed=1, n_stages=3) -> nn.Module:
    torch.manual_seed(seed)
    cls = PlainConvUNet if style == "plain" else ResidualEncoderUNet
    net = cls(1, num_classes=num_classes, deep_supervision=ds, **arch_kwargs(dim, style, n_stages))
    net.apply(net.initialize)
    return net


# ---------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("style", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [3, 2])
def test_output_shapes_and_deep_supervision(style, dim):
    net = make_banet(dim, style, ds=True, n_stages=3)
    size = (16,) * dim
    x = torch.randn(2, 1, *size)
    net.train()
    seg, bnd = net(x)
    assert isinstance(seg, list) and isinstance(bnd, list) and len(seg) == len(bnd) == 2
    for i, (s, b) in enumerate(zip(seg, bnd)):
        spatial = tuple(d // 2**i for d in size)
        assert s.shape == (2, 3, *spatial)
        assert b.shape == (2, 2, *spatial)
    # nnU-Net's set_deep_supervision_enabled only sets decoder.deep_supervision; the boundary decoder follows
    net.decoder.deep_supervision = False
    seg, bnd = net(x)
    assert seg.shape == (2, 3, *size) and bnd.shape == (2, 2, *size)
    # eval mode: segmentation only, like a stock nnU-Net network (tensor without DS, list with DS)
    net.eval()
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size)
        net.decoder.deep_supervision = True
        out = net(x)
        assert isinstance(out, list) and len(out) == 2 and out[0].shape == (2, 3, *size)


def test_parameter_names_match_nnunet_networks():
    for style in ("plain", "resenc"):
        ours = set(make_banet(style=style).state_dict())
        ref = set(make_reference(style=style).state_dict())
        assert ref <= ours
        extra = ours - ref
        assert extra and all(k.startswith("boundary.seg_layers.") for k in extra)
    # the boundary heads: 1x1x1, 2 channels, no bias, one per decoder stage
    net = make_banet(n_stages=4)
    heads = net.boundary_decoder.heads
    assert len(heads) == len(net.decoder.stages) == 3
    assert all(h.bias is None and h.out_channels == 2 and h.kernel_size == (1, 1, 1) for h in heads)
    # identical structure, separate weights
    assert len(net.boundary_decoder.stages) == len(net.decoder.stages)
    assert net.boundary_decoder.stages[0] is not net.decoder.stages[0]
    shapes = [p.shape for p in net.boundary_decoder.stages.parameters()]
    assert shapes == [p.shape for p in net.decoder.stages.parameters()]


def test_invalid_kwargs():
    kw = arch_kwargs()
    with pytest.raises(ValueError, match="exactly one"):
        BANet(1, num_classes=2, n_blocks_per_stage=[1, 1, 1], **kw)
    kw.pop("n_conv_per_stage")
    with pytest.raises(ValueError, match="exactly one"):
        BANet(1, num_classes=2, **kw)


def test_modulation_is_applied_before_skip_concatenation():
    """With zero boundary heads softmax(.)[:, 1] = 0.5 everywhere, so BA-Net must equal a plain U-Net whose
    upsampling (linear) is scaled by 1 + 0.5. With trained heads the output differs from that."""
    net = make_banet(ds=False).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        out_random_heads = net(x)
        for h in net.boundary_decoder.heads:
            h.weight.zero_()
        out_zero_heads = net(x)
        plain = make_reference(ds=False).eval()
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("boundary.")})
        for t in plain.decoder.transpconvs:
            t.weight.mul_(1.5)
            t.bias.mul_(1.5)
        expected = plain(x)
    torch.testing.assert_close(out_zero_heads, expected, rtol=1e-4, atol=1e-5)
    assert (out_random_heads - out_zero_heads).abs().max() > 1e-3


def test_modulated_concat_matches_the_plain_formula_and_its_gradients():
    """The memory-lean ModulatedConcat (saves its output instead of the upsampled features) computes
    cat(up * (1 + gate), skip) with exact gradients: gradcheck in float64, and equal to autograd of the formula."""
    from nnunet_ext.architectures.banet import ModulatedConcat, boundary_gate

    torch.manual_seed(0)
    up = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda u, lg, sk: ModulatedConcat.apply(u, boundary_gate(lg), sk), (up, logits, skip)
    )

    gate = boundary_gate(logits)
    torch.testing.assert_close(gate, torch.softmax(logits, 1)[:, 1:2])
    weight = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64)
    (ModulatedConcat.apply(up, gate, skip) * weight).sum().backward()
    lean = [t.grad.clone() for t in (up, logits, skip)]
    for t in (up, logits, skip):
        t.grad = None
    (torch.cat((up * (1 + torch.softmax(logits, 1)[:, 1:2]), skip), 1) * weight).sum().backward()
    for a, b in zip(lean, (up.grad, logits.grad, skip.grad)):
        torch.testing.assert_close(a, b)


def _banet_loss(ignore_label=None, n_outputs=2):
    def dc_ce():
        return DC_and_CE_loss(
            {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=ignore_label,
            dice_class=MemoryEfficientSoftDiceLoss,
        )

    weights = np.array([1 / 2**i for i in range(n_outputs)])
    if n_outputs > 1:
        weights[-1] = 0  # nnU-Net's deep-supervision weights
    weights = weights / weights.sum()
    return BoundaryAwareLoss(
        DeepSupervisionWrapper(dc_ce(), weights), DeepSupervisionWrapper(dc_ce(), weights)
    )


@pytest.mark.parametrize("style", ["plain", "resenc"])
def test_gradients_reach_encoder_and_both_decoders(style):
    from nnunet_ext.banet.boundary_targets import boundary_targets_for_deep_supervision

    net = make_banet(style=style, n_stages=3).train()
    x = torch.randn(2, 1, 16, 16, 16)
    lab = torch.zeros(2, 1, 16, 16, 16, dtype=torch.int16)
    lab[:, :, 4:12, 4:12, 4:12] = 1
    lab[:, :, 6:10, 6:10, 6:10] = 2
    scales = [[1, 1, 1], [0.5, 0.5, 0.5]]
    targets = [lab, lab[:, :, ::2, ::2, ::2]]
    btargets = boundary_targets_for_deep_supervision(lab, scales)
    seg, bnd = net(x)
    loss = _banet_loss()(seg, targets, bnd, btargets)
    loss.backward()

    def grad_norm(module):
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    assert grad_norm(net.encoder) > 0
    assert grad_norm(net.decoder.stages) > 0
    assert grad_norm(net.boundary_decoder.stages) > 0
    assert all(h.weight.grad.abs().sum() > 0 for h in net.boundary_decoder.heads)

    # not detached: the segmentation loss alone also trains the boundary decoder (through the modulation)
    net.zero_grad()
    seg, bnd = net(x)
    _banet_loss().seg_loss(seg, targets).backward()
    assert grad_norm(net.boundary_decoder.stages) > 0


def test_boundary_loss_ignores_ignore_label():
    loss = _banet_loss(ignore_label=4, n_outputs=1)
    out = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int16)
    target[..., 2:5, 2:5, 2:5] = 1
    target[..., 6:] = 4  # ignored voxels
    loss.boundary_loss.loss(out, target).backward()
    assert out.grad[..., 6:].abs().max() == 0
    assert out.grad[..., :6].abs().max() > 0


@pytest.mark.parametrize("style", ["plain", "resenc"])
def test_plain_checkpoint_loads_via_nnunet_load_pretrained_weights(tmp_path, style):
    plain = make_reference(style=style, seed=123)
    ckpt = tmp_path / "plain.pth"
    torch.save({"network_weights": plain.state_dict()}, ckpt)
    net = make_banet(style=style, seed=7)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_pretrained_weights(net, str(ckpt))
    after = net.state_dict()
    plain_sd = plain.state_dict()
    n_copied = 0
    for k, v in after.items():
        if k.startswith("boundary.") or ".seg_layers." in k:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # keeps its initialisation
        else:
            torch.testing.assert_close(v, plain_sd[k], rtol=0, atol=0)
            n_copied += 1
    assert n_copied > 10
    assert any(not torch.equal(plain_sd[k], before[k]) for k in plain_sd if k.startswith("encoder."))


def test_compute_conv_feature_map_size():
    net = make_banet()
    ref = make_reference()
    assert net.compute_conv_feature_map_size((16, 16, 16)) > ref.compute_conv_feature_map_size((16, 16, 16))


# ---------------------------------------------------------------------------------------------------- trainer
DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_BANetTiny"


def _write_tiny_raw_dataset(raw_root: str, n_cases: int = 5, shape=(20, 20, 20)) -> None:
    import SimpleITK as sitk

    folder = os.path.join(raw_root, DATASET_NAME)
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        lab = np.zeros(shape, np.uint8)
        c = rng.integers(7, 13, size=3)
        lab[c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 5 : c[2] + 5] = 1
        lab[c[0] - 2 : c[0] + 3, c[1] - 2 : c[1] + 3, c[2] - 5 : c[2] + 1] = 2
        img = (lab * 100.0 + rng.normal(0, 10, shape)).astype(np.float32)
        for arr, sub, fname in (
            (img, "imagesTr", f"case_{i:03d}_0000.nii.gz"),
            (lab, "labelsTr", f"case_{i:03d}.nii.gz"),
        ):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(im, os.path.join(folder, sub, fname))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "a": 1, "b": 2},
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
            },
            f,
        )


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory):
    """A tiny nnU-Net dataset (5 cases of 20^3, labels 0/1/2), fingerprinted, planned and preprocessed with
    nnU-Net's own API; the 3d_fullres plans are shrunk to 3 stages, 4-8 features, patch 16^3, batch 2."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    root = tmp_path_factory.mktemp("nnunet")
    dirs = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dirs.items():
            os.makedirs(v)
            mp.setenv(k, v)
        mp.setenv("nnUNet_compile", "f")
        mp.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's planner calls torch.set_num_threads with this value
        _write_tiny_raw_dataset(dirs["nnUNet_raw"])
        extract_fingerprint_dataset(
            DATASET_ID, num_processes=1, check_dataset_integrity=False, verbose=False, show_progress_bar=False
        )
        plan_experiment_dataset(DATASET_ID)
        plans_file = os.path.join(dirs["nnUNet_preprocessed"], DATASET_NAME, "nnUNetPlans.json")
        with open(plans_file) as f:
            plans = json.load(f)
        cfg = plans["configurations"]["3d_fullres"]
        cfg.update(patch_size=[16, 16, 16], batch_size=2)
        cfg["architecture"]["arch_kwargs"].update(
            n_stages=3,
            features_per_stage=[4, 8, 8],
            kernel_sizes=[[3, 3, 3]] * 3,
            strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            n_conv_per_stage=[1, 1, 1],
            n_conv_per_stage_decoder=[1, 1],
        )
        with open(plans_file, "w") as f:
            json.dump(plans, f)
        preprocess_dataset(
            DATASET_ID,
            configurations=("3d_fullres",),
            num_processes=[1],
            verbose=False,
            show_progress_bar=False,
        )
        mp.setenv("nnUNet_n_proc_DA", "0")  # single-threaded data augmentation in the trainer tests
        yield dirs


def _load(dirs):
    base = os.path.join(dirs["nnUNet_preprocessed"], DATASET_NAME)
    with open(os.path.join(base, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def make_trainer(dirs, cls=None, fold=0, plans=None):
    from nnunet_ext.trainers import nnUNetTrainerBANet

    cls = cls or nnUNetTrainerBANet
    p, dataset_json = _load(dirs)
    plans = deepcopy(plans or p)
    plans["continue_training"] = False
    return cls(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))


def _remove_splits(dirs):
    f = os.path.join(dirs["nnUNet_preprocessed"], DATASET_NAME, "splits_final.json")
    if os.path.isfile(f):
        os.remove(f)
    return f


@pytest.mark.slow  # shares the ~20 s nnU-Net plan+preprocess fixture
def test_trainer_builds_banet_from_plain_and_resenc_plans(nnunet_dirs):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.trainers import nnUNetTrainerBANet

    plans, _ = _load(nnunet_dirs)
    for style in ("plain", "resenc", "banet"):
        p = deepcopy(plans)
        arch = p["configurations"]["3d_fullres"]["architecture"]
        if style == "resenc":
            arch["network_class_name"] = (
                "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
            )
            arch["arch_kwargs"]["n_blocks_per_stage"] = arch["arch_kwargs"].pop("n_conv_per_stage")
        if style == "banet":
            arch["network_class_name"] = "nnunet_ext.architectures.banet.BANet"
        pm = PlansManager(p)
        net = nnUNetTrainerBANet.build_network_architecture(
            pm, pm.get_configuration("3d_fullres"), 1, 3, True
        )
        assert isinstance(net, BANet)
        net.train()
        seg, bnd = net(torch.randn(2, 1, 16, 16, 16))
        assert len(seg) == len(bnd) == 2
    p = deepcopy(plans)
    p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["some_unknown_kwarg"] = 3
    pm = PlansManager(p)
    with pytest.raises(UserError, match="some_unknown_kwarg"):
        nnUNetTrainerBANet.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)


@pytest.mark.slow  # shares the ~20 s nnU-Net plan+preprocess fixture
def test_train_step_checkpoint_round_trip_and_prediction(nnunet_dirs, tmp_path):
    """train_step on a real augmented batch; save_checkpoint -> new trainer load_checkpoint predicts identically;
    the stock nnUNetPredictor loads the trained folder by trainer name and predicts."""
    _remove_splits(nnunet_dirs)
    trainer = make_trainer(nnunet_dirs)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.set_deep_supervision_enabled(True)
    trainer.on_train_epoch_start()
    batch = next(trainer.dataloader_train)
    assert isinstance(batch["target"], list) and len(batch["target"]) == 2
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
    assert all(np.isfinite(losses))
    after = trainer.network.state_dict()
    for prefix in (
        "encoder.",
        "decoder.stages.",
        "boundary.seg_layers.stages.",
        "boundary.seg_layers.heads.",
    ):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix

    # nnU-Net's validation_step runs unchanged (eval mode returns segmentation only)
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        val = trainer.validation_step(next(trainer.dataloader_val))
    assert np.isfinite(val["loss"]) and len(val["tp_hard"]) == 2

    ckpt = str(tmp_path / "checkpoint_final.pth")
    trainer.save_checkpoint(ckpt)
    trainer2 = make_trainer(nnunet_dirs)
    trainer2.load_checkpoint(ckpt)
    x = torch.randn(1, 1, 16, 16, 16)
    for t in (trainer, trainer2):
        t.set_deep_supervision_enabled(False)
        t.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.network(x), trainer2.network(x), rtol=0, atol=0)

    # the stock predictor: finds the trainer by name through nnUNet_extTrainer, builds BANet via
    # build_network_architecture, loads the checkpoint strictly and predicts
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ext import trainer_dir

    out_base = trainer.output_folder_base
    os.makedirs(os.path.join(out_base, "fold_0"), exist_ok=True)
    plans, dataset_json = _load(nnunet_dirs)
    with open(os.path.join(out_base, "plans.json"), "w") as f:
        json.dump(plans, f)
    with open(os.path.join(out_base, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    os.replace(ckpt, os.path.join(out_base, "fold_0", "checkpoint_final.pth"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_extTrainer", trainer_dir())
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            out_base, use_folds=(0,), checkpoint_name="checkpoint_final.pth"
        )
    assert isinstance(predictor.network, BANet)
    data = torch.randn(1, 20, 20, 20)
    logits = predictor.predict_logits_from_preprocessed_data(data)
    assert logits.shape == (3, 20, 20, 20) and torch.isfinite(logits).all()


@pytest.mark.slow  # shares the ~20 s nnU-Net plan+preprocess fixture
def test_pretrained_plain_nnunet_checkpoint_through_stock_path(nnunet_dirs, tmp_path):
    """A checkpoint saved by the stock nnUNetTrainer on the same plans loads through run_training's
    maybe_load_checkpoint (what `nnUNetv2_train ... -pretrained_weights FILE` calls)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plain = make_trainer(nnunet_dirs, cls=nnUNetTrainer)
    plain.initialize()
    ckpt = str(tmp_path / "plain_checkpoint.pth")
    plain.save_checkpoint(ckpt)
    plain_sd = plain.network.state_dict()

    trainer = make_trainer(nnunet_dirs)
    trainer.initialize()
    boundary_before = {
        k: v.clone() for k, v in trainer.network.state_dict().items() if k.startswith("boundary.")
    }
    maybe_load_checkpoint(
        trainer, continue_training=False, validation_only=False, pretrained_weights_file=ckpt
    )
    sd = trainer.network.state_dict()
    for k, v in sd.items():
        if k.startswith("boundary."):
            torch.testing.assert_close(v, boundary_before[k], rtol=0, atol=0)
        elif ".seg_layers." not in k:
            torch.testing.assert_close(v, plain_sd[k], rtol=0, atol=0)


@pytest.mark.slow  # shares the ~20 s nnU-Net plan+preprocess fixture
def test_4fold_split(nnunet_dirs):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunet_ext.core.splits import kfold_split
    from nnunet_ext.trainers import nnUNetTrainerBANet_4fold

    splits_file = _remove_splits(nnunet_dirs)
    try:
        with pytest.raises(UserError, match="4-fold"):
            make_trainer(nnunet_dirs, cls=nnUNetTrainerBANet_4fold, fold=4)
        ids = [f"case_{i:03d}" for i in range(5)]
        expected = generate_crossval_split(sorted(ids), seed=12345, n_splits=4)
        assert kfold_split(ids[::-1], 4) == [
            {"train": list(s["train"]), "val": list(s["val"])} for s in expected
        ]

        val_all = []
        for fold in range(4):
            trainer = make_trainer(nnunet_dirs, cls=nnUNetTrainerBANet_4fold, fold=fold)
            tr, val = trainer.do_split()
            assert sorted(tr + val) == ids and not set(tr) & set(val)
            assert val == list(expected[fold]["val"])
            val_all += val
        assert sorted(val_all) == ids
        with open(splits_file) as f:
            assert len(json.load(f)) == 4  # written in nnU-Net's place and format
        trainer = make_trainer(nnunet_dirs, cls=nnUNetTrainerBANet_4fold, fold="all")
        assert sorted(trainer.do_split()[0]) == ids

        # an existing split with another number of folds is not silently used or overwritten
        with open(splits_file, "w") as f:
            json.dump([{"train": ids[1:], "val": ids[:1]}] * 5, f)
        trainer = make_trainer(nnunet_dirs, cls=nnUNetTrainerBANet_4fold, fold=0)
        with pytest.raises(UserError, match="5-fold"):
            trainer.do_split()
    finally:
        _remove_splits(nnunet_dirs)


def test_schedule_variants_exist():
    import nnunet_ext.trainers as t

    assert issubclass(t.nnUNetTrainerBANet_smoke, t.nnUNetTrainerBANet)
    assert issubclass(t.nnUNetTrainerBANet_4fold_demo, t.nnUNetTrainerBANet_4fold)


@pytest.mark.slow  # shares the ~20 s nnU-Net plan+preprocess fixture
def test_train_step_with_ignore_label(nnunet_dirs):
    """The ignore label reaches both losses: boundary targets keep it, and train_step runs with it."""
    plans, dataset_json = _load(nnunet_dirs)
    dataset_json = deepcopy(dataset_json)
    dataset_json["labels"]["ignore"] = 3
    from nnunet_ext.trainers import nnUNetTrainerBANet

    p = deepcopy(plans)
    p["continue_training"] = False
    trainer = nnUNetTrainerBANet(p, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    assert trainer.label_manager.ignore_label == 3
    lab = torch.zeros(2, 1, 16, 16, 16, dtype=torch.int16)
    lab[:, :, 4:12, 4:12, 4:12] = 1
    lab[:, :, 6:10, 6:10, 6:10] = 2
    lab[:, :, :, :, 12:] = 3
    target = [lab, torch.nn.functional.interpolate(lab.float(), (8, 8, 8), mode="nearest-exact").short()]
    boundary = trainer.boundary_targets(target)
    assert [b.shape for b in boundary] == [t.shape for t in target]
    assert torch.equal(boundary[0] == 3, lab == 3) and torch.equal(boundary[1] == 3, target[1] == 3)
    assert set(boundary[0].unique().tolist()) == {0, 1, 3}
    trainer.network.train()
    out = trainer.train_step({"data": torch.randn(2, 1, 16, 16, 16), "target": target, "keys": ["a", "b"]})
    assert np.isfinite(out["loss"])


@pytest.mark.slow  # shares the ~20 s nnU-Net plan+preprocess fixture
def test_region_based_datasets_are_rejected(nnunet_dirs):
    from nnunet_ext.trainers import nnUNetTrainerBANet

    plans, dataset_json = _load(nnunet_dirs)
    dataset_json = deepcopy(dataset_json)
    dataset_json["labels"] = {"background": 0, "whole": [1, 2], "inner": 2}
    dataset_json["regions_class_order"] = [1, 2]
    p = deepcopy(plans)
    p["continue_training"] = False
    with pytest.raises(UserError, match="region"):
        nnUNetTrainerBANet(p, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
