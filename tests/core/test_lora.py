"""LoRA on nnU-Net networks (nnunet_ext.core.lora): injection through the alias trap, gradients, exact merge,
strict loading of merged weights into the stock network; nnUNetTrainerLoRA (pretrained -> adapters ->
merged checkpoint, resume). Tiny networks on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from support.ddp_ranks import ddp_rank
from support.lora_helpers import _setenv, arch_kwargs, foundation_checkpoint, make_net, make_trainer  # noqa: F401
from torch import nn

from nnunet_ext.core import lora, train_step

torch.set_num_threads(2)


def randomise_adapters(net: nn.Module, std: float = 0.2) -> None:
    torch.manual_seed(1)
    for _, layer in lora.lora_layers(net):
        nn.init.normal_(layer.lora_B["default"].weight, std=std)


@pytest.mark.parametrize("style", ["plain", "resenc"])
def test_adapters_change_outputs_and_receive_gradients(style):
    net = make_net(style)
    x = torch.randn(2, 1, 8, 16, 16)
    before = net(x)[0].detach()
    names = lora.inject_lora(net, lora.LoRAConfig(rank=2, alpha=4))
    lora.mark_trainable(net)
    # every conv and transposed conv except the heads, each adapted once, aliases included
    convs = [n for n, m in make_net(style).named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert sorted(names) == sorted(n for n in convs if "seg_layers" not in n)
    assert any("transpconvs" in n for n in names)
    for name, module in net.named_modules(remove_duplicate=False):
        if name.endswith(".all_modules.0"):
            assert lora._is_lora_layer(module)  # the path the forward pass uses is adapted
    torch.testing.assert_close(net(x)[0], before)  # B = 0: unchanged until trained
    randomise_adapters(net)
    out = net(x)[0]
    assert (out - before).abs().max() > 1e-3
    (out * torch.randn_like(out)).sum().backward()
    for name, p in net.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif "seg_layers" not in name:
            assert not p.requires_grad and p.grad is None, name


def test_by_name_replacement_alone_changes_nothing():
    """The trap the identity replacement avoids: swapping only `.conv` leaves `.all_modules.0` in use."""
    net = make_net("plain")
    x = torch.randn(1, 1, 8, 16, 16)
    before = net(x)[0].detach()
    block = net.encoder.stages[0][0].convs[0]
    block.conv = nn.Conv3d(block.conv.in_channels, block.conv.out_channels, 3, padding=1)
    torch.testing.assert_close(net(x)[0], before, rtol=0, atol=0)


@pytest.mark.parametrize("style,dim", [("plain", 3), ("resenc", 3), ("plain", 2)])
def test_merge_is_exact_and_loads_strictly_into_stock_network(style, dim):
    net = make_net(style, dim)
    stock_keys = list(net.state_dict())
    lora.inject_lora(net, lora.LoRAConfig(rank=3, alpha=6))
    randomise_adapters(net)
    if style == "resenc":  # 1x1x1 skip projections are adapted (peft 0.21.2's own merge crashes on them)
        assert any(m.base_layer.kernel_size == (1, 1, 1) for _, m in lora.lora_layers(net))
    x = torch.randn(2, 1, *([8, 16, 16] if dim == 3 else [16, 16]))
    net.eval()
    with torch.no_grad():
        adapted = net(x)[0]
    merged_sd = lora.merged_state_dict(net)
    assert list(merged_sd) == stock_keys  # stock names, alias keys included
    fresh = make_net(style, dim, seed=5)
    fresh.load_state_dict(merged_sd, strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], adapted, rtol=1e-4, atol=1e-5)
    assert lora.lora_layers(net)  # merged_state_dict left the adapted network alone
    lora.merge_lora(net)
    assert not lora.lora_layers(net) and list(net.state_dict()) == stock_keys
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", ["plain", "resenc"])
def test_merged_weights_plus_adapters_rebuild_the_unmerged_network(style):
    """What a LoRA checkpoint stores (merged stock weights + adapters only) rebuilds the adapted network:
    same frozen base (to float rounding), same adapters, same outputs."""
    net = make_net(style)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = lora.LoRAConfig(rank=2)
    lora.inject_lora(net, cfg)
    randomise_adapters(net)
    merged, adapters = lora.merged_state_dict(net), lora.adapter_state_dict(net)
    assert adapters and not any(".base_layer." in k for k in adapters)
    fresh = make_net(style, seed=5)  # other weights: everything must come from the two dicts
    lora.inject_lora(fresh, cfg)
    lora.load_merged_with_adapters(fresh, merged, adapters)
    rebuilt = fresh.state_dict()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in original.items():  # base layers hold the original (pretrained) weights again
        torch.testing.assert_close(
            lora.strip_lora(copy.deepcopy(fresh)).state_dict()[key], value, atol=1e-6, rtol=0
        )
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], net(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="not in the checkpoint"):
        lora.load_merged_with_adapters(fresh, merged, {})


def test_strip_returns_the_network_before_adaptation():
    net = make_net("plain")
    reference = copy.deepcopy(net)
    lora.inject_lora(net, lora.LoRAConfig(rank=2))
    randomise_adapters(net)
    stripped = lora.strip_lora(copy.deepcopy(net))
    for (k, v), (k2, v2) in zip(stripped.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_layer_patterns_and_errors():
    net = make_net("plain")
    names = lora.inject_lora(net, lora.LoRAConfig(rank=2, target=(r"^encoder\.",)))
    assert names and all(n.startswith("encoder.") for n in names)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject_lora(net, lora.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="no convolution matches"):
        lora.inject_lora(make_net("plain"), lora.LoRAConfig(target=(r"^nothing",)))
    with pytest.raises(ValueError, match="rank"):
        lora.LoRAConfig(rank=0)
    assert lora.LoRAConfig.from_dict(lora.LoRAConfig(rank=3).to_dict()) == lora.LoRAConfig(rank=3)


def test_trainable_parameters_of_the_default_network_stay_under_5_percent():
    """nnUNetTrainerLoRA's defaults on nnU-Net's default 3d_fullres network (32..320 features, 6 stages)."""
    from nnunet_ext.trainers import nnUNetTrainerLoRA as T

    net = make_net("plain", features=(32, 64, 128, 256, 320, 320))
    config = lora.LoRAConfig(
        rank=T.lora_rank, alpha=T.lora_alpha, target=T.lora_target, exclude=T.lora_exclude
    )
    lora.inject_lora(net, config)
    lora.mark_trainable(net, T.lora_train_also)
    report = lora.report(net)
    assert 0 < report.trainable_fraction <= 0.05, str(report)
    assert "adapted layers" in str(report)


# ------------------------------------------------------------------------------------ trainer


def test_poly_schedule_decays_every_group_from_its_own_learning_rate():
    from nnunet_ext.core.schedules import PolyLRScheduler

    adapters, head = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [adapters], "lr": 0.1}, {"params": [head]}], lr=0.01, momentum=0.99)
    sched = PolyLRScheduler(opt, 100)
    for epoch, factor in ((0, 1.0), (50, 0.5**0.9), (99, 0.01**0.9)):
        sched.step(epoch)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.01 * factor])
    # one group, no warm-up: exactly nnU-Net's PolyLRScheduler
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler as Stock

    ours, stock = (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01) for _ in range(2))
    a, b = PolyLRScheduler(ours, 1000), Stock(stock, 0.01, 1000)
    for epoch in (0, 1, 500, 999):
        a.step(epoch)
        b.step(epoch)
        assert ours.param_groups[0]["lr"] == pytest.approx(stock.param_groups[0]["lr"], rel=1e-12)


@pytest.fixture
def pretrained(phantom_workspace):
    return foundation_checkpoint(phantom_workspace)


@pytest.mark.slow
def test_lora_trainer_pretrained_merged_checkpoint_and_resume(
    phantom_workspace, pretrained, monkeypatch, tmp_path
):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    _setenv(monkeypatch, phantom_workspace)
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    dataset, ckpt = pretrained

    # without -pretrained_weights: refused with the fix
    trainer = make_trainer("nnUNetTrainerLoRA_smoke", dataset)
    trainer.initialize()
    with pytest.raises(RuntimeError, match="-pretrained_weights"):
        trainer.inject_adapters()

    trainer = make_trainer("nnUNetTrainerLoRA_smoke", dataset)
    trainer.num_iterations_per_epoch = 2
    trainer.lora_lr = 0.05  # adapters at their own learning rate, the head at nnU-Net's initial_lr
    maybe_load_checkpoint(trainer, False, False, ckpt)  # exactly nnUNetv2_train's -pretrained_weights path
    base = torch.load(ckpt, weights_only=False)["network_weights"]
    trainer.run_training()
    final = torch.load(trainer.output_folder + "/checkpoint_final.pth", weights_only=False)
    assert {"lora_state", "lora_config"} <= set(final)
    groups = final["optimizer_state"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.05, trainer.initial_lr]
    assert lora.has_lora_keys(final["lora_state"]) and not lora.has_lora_keys(final["network_weights"])
    # the body is stored once: lora_state holds the adapters only
    assert final["lora_format"] == "adapters"
    assert final["lora_state"] and all(lora.is_adapter_parameter(k) for k in final["lora_state"])
    k = "encoder.stages.1.0.convs.0.conv.weight"
    assert not torch.equal(final["network_weights"][k], base[k])  # merged = base + trained adapter

    # merged checkpoint: strict load into the stock network; same predictions as the trained network
    stock = nnUNetTrainer.build_network_architecture(
        trainer.plans_manager,
        trainer.configuration_manager,
        1,
        trainer.label_manager.num_segmentation_heads,
        False,
    )
    stock.load_state_dict(final["network_weights"], strict=True)
    stock.eval()
    trainer.network.eval()  # after training: the merged network
    trainer.set_deep_supervision_enabled(False)
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(stock(x), trainer.network(x), rtol=1e-4, atol=1e-5)

    # and -pretrained_weights of a next training accepts it
    nxt = make_trainer("nnUNetTrainerLoRA_smoke", dataset, fold=1)
    maybe_load_checkpoint(nxt, False, False, trainer.output_folder + "/checkpoint_final.pth")

    # resume (--c): adapters re-injected, unmerged state and optimizer restored
    resumed = make_trainer("nnUNetTrainerLoRA_smoke", dataset)
    resumed.load_checkpoint(trainer.output_folder + "/checkpoint_final.pth")
    assert resumed.lora_injected and resumed.current_epoch == 1
    assert [g["initial_lr"] for g in resumed.optimizer.param_groups] == [0.05, trainer.initial_lr]
    n_adapters = 2 * len(lora.lora_layers(resumed.base_network()))  # lora_A + lora_B of each layer
    # weight + bias of each head (aliases: one parameter per head in the optimizer)
    n_heads = len({k.split(".seg_layers.")[1] for k in final["network_weights"] if ".seg_layers." in k})
    assert [len(g["params"]) for g in groups] == [n_adapters, n_heads]
    sd = resumed.base_network().state_dict()
    for key, value in final["lora_state"].items():
        assert torch.equal(sd[key], value), key
    # frozen base rebuilt from merged - delta: the pretrained weights (float rounding)
    torch.testing.assert_close(sd[k.replace(".weight", ".base_layer.weight")], base[k], rtol=0, atol=1e-6)
    # and the resumed network merges back to exactly the checkpoint's weights (to rounding)
    for key, value in lora.merged_state_dict(resumed.base_network()).items():
        torch.testing.assert_close(value, final["network_weights"][key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow  # dynamo tracing takes ~10 s on CPU
def test_uncompiled_strips_compile_at_every_depth_and_leaves_the_original():
    """nnU-Net compiles the Dice term inside its loss (loss.dc); MedSeqFT's per-term gradient norms need a second
    backward, which a compiled graph with donated buffers refuses: train_step.uncompiled gives the plain modules."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch._dynamo import OptimizedModule

    inner = DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    inner.dc = torch.compile(inner.dc, backend="eager")  # as nnU-Net's _build_loss does with compile on
    loss = torch.compile(DeepSupervisionWrapper(inner, [1.0, 0.5]), backend="eager")
    plain = train_step.uncompiled(loss)

    def compiled_parts(m):
        return [n for n, c in m.named_modules() if isinstance(c, OptimizedModule)]

    assert not isinstance(plain, OptimizedModule) and compiled_parts(plain) == []
    assert isinstance(loss, OptimizedModule) and isinstance(
        loss._orig_mod.loss.dc, OptimizedModule
    )  # untouched
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 8, 8, 8, requires_grad=True), torch.randn(2, 3, 4, 4, 4, requires_grad=True)]
    targets = [torch.randint(0, 3, (2, 1, 8, 8, 8)).float(), torch.randint(0, 3, (2, 1, 4, 4, 4)).float()]
    value = plain(outputs, targets)
    torch.testing.assert_close(value, loss(outputs, targets))
    first = torch.autograd.grad(value, outputs, retain_graph=True)  # two backward passes of one graph
    second = torch.autograd.grad(value, outputs)
    torch.testing.assert_close(first, second)


def test_adapted_network_under_torch_compile_and_autocast():
    """What nnUNetTrainerLoRA / MedSeqFT train: compiled (the aot_eager backend traces exactly what inductor
    would compile, without needing a C++ compiler) and under autocast; same outputs, adapters get gradients."""
    from nnunet_ext.medseqft.method import FeatureTap

    net = make_net("plain")
    lora.inject_lora(net, lora.LoRAConfig(rank=2))
    lora.mark_trainable(net)
    randomise_adapters(net)
    tap = FeatureTap(net)
    x = torch.randn(2, 1, 8, 16, 16)
    eager_out, eager_feats = tap(x, features=True)
    compiled = torch.compile(tap, backend="aot_eager")
    out, feats = compiled(x, features=True)
    for a, b in zip([*eager_out, *eager_feats], [*out, *feats]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    (out[0].square().mean() + feats[-1].square().mean()).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if ".lora_" in n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = tap(x)
    assert mixed[0].dtype == torch.bfloat16
    torch.testing.assert_close(mixed[0].float(), eager_out[0].detach(), rtol=0.1, atol=0.1)


@pytest.mark.slow  # two processes, ~15 s on CPU
def test_lora_training_step_under_ddp(tmp_path):
    """-num_gpus: the adapted network and MedSeqFT's one-pass step under DistributedDataParallel (gloo on CPU; the
    NCCL path is the same module code). No unused trainable parameter (DDP would fail), gradients averaged:
    every rank ends with the same adapters, and they moved."""
    import torch.multiprocessing as mp

    world = 2
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=ddp_rank, args=(r, world, str(tmp_path / "init"), outs[r])) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (torch.load(o, weights_only=False) for o in outs)
    assert set(r0["trainable"]) == set(r1["trainable"]) and any(".lora_B." in n for n in r0["trainable"])
    for name, value in r0["trainable"].items():
        torch.testing.assert_close(value, r1["trainable"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(v.abs().sum() > 0 for n, v in r0["trainable"].items() if ".lora_B." in n)  # adapters trained
    base = make_net("plain").state_dict()
    assert set(r0["merged"]) == set(base)  # stock keys after merging
