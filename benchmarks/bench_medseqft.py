"""MedSeqFT / LoRA benchmark (docs/medseqft.md, docs/lora.md, docs/benchmarks.md "## MedSeqFT and LoRA").

    python benchmarks/bench_medseqft.py --parts efficiency              # seconds to minutes on CPU
    python benchmarks/bench_medseqft.py --parts sequence --workdir /tmp/bench_medseqft --epochs 4 --iterations 10

Parts:

* ``efficiency``: on nnU-Net's default 3d_fullres U-Net (6 stages, 32..320 features, 2 convs per stage,
  PlainConvUNet; or ``--plans FILE --configuration CFG``) at ``--patch``: trainable parameters, gradient +
  optimizer-state memory (SGD momentum buffers, counted after one step) and train-step time (forward,
  nnU-Net's Dice+CE with deep supervision, backward, SGD step; random data) of full fine-tuning
  (``nnUNetTrainer``) vs LoRA (``nnUNetTrainerLoRA``'s defaults) vs a MedSeqFT step (LoRA + a buffer batch in
  the same forward pass + feature distillation against 2 frozen teachers), all in ONE process on the same
  network, interleaved in rounds (full, LoRA, MedSeqFT, ...); ratios are medians of per-round ratios.
* ``memory``: activation memory (bytes autograd saves for backward) of full fine-tuning at batch B vs the
  MedSeqFT student's one forward pass over B task + ``kd_batch_size`` buffer patches (B and 1);
* ``sequence``: the forgetting matrices of MedSeqFT (with and without the expert stage) vs sequential vs parallel full fine-tuning on the phantom
  task sequence (liver -> kidney -> spleen, binary datasets, ``nnunet-ext medseqft phantoms``) from M_0 =
  ``nnUNetTrainer`` on the full phantom, all with the tiny configuration and the same ``--epochs`` x
  ``--iterations`` per training (``nnunet-ext medseqft run``).

Everything of ``sequence`` is written under ``--workdir`` (own nnUNet_raw/preprocessed/results); results go to
``<workdir>/bench_medseqft.json`` (efficiency: ``--json``) and are printed as markdown with the machine line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


def machine_line() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    return f"{dev}, torch {torch.__version__}, {platform.python_version()}, threads {torch.get_num_threads()}"


def default_network(features=(32, 64, 128, 256, 320, 320)) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(features)
    net = PlainConvUNet(
        input_channels=1,
        n_stages=n,
        features_per_stage=list(features),
        conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        num_classes=3,
        n_conv_per_stage_decoder=[2] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    net.apply(net.initialize)
    return net


def plans_network(plans_file: str, configuration: str) -> tuple[nn.Module, list[int]]:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(json.loads(Path(plans_file).read_text()))
    cm = pm.get_configuration(configuration)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, True)
    return net, list(cm.patch_size)


def _loss(net: nn.Module):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    n = len(net.decoder.stages)
    weights = [1 / 2**i for i in range(n)]
    weights[-1] = 0
    weights = [w / sum(weights) for w in weights]
    base = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        1,
        1,
        None,
        MemoryEfficientSoftDiceLoss,
    )
    return DeepSupervisionWrapper(base, weights)


def _targets(out: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 3, (o.shape[0], 1, *o.shape[2:]), generator=g).float().to(o.device) for o in out]


def efficiency(args) -> dict:
    from nnunet_ext.core import lora
    from nnunet_ext.medseqft.method import FeatureTap, unet_features
    from nnunet_ext.trainers import nnUNetTrainerLoRA as T

    if args.plans:
        base, patch = plans_network(args.plans, args.configuration)
    else:
        base, patch = default_network(), list(args.patch)
    patch = list(args.patch) if args.patch else patch
    device = torch.device(args.device)
    base.to(device)
    full = copy.deepcopy(base)
    adapted = copy.deepcopy(base)
    lora.inject_lora(
        adapted,
        lora.LoRAConfig(rank=T.lora_rank, alpha=T.lora_alpha, target=T.lora_target, exclude=T.lora_exclude),
    )
    lora.mark_trainable(adapted, T.lora_train_also)
    adapted.to(device)
    medseqft = FeatureTap(copy.deepcopy(adapted))
    teachers = [copy.deepcopy(base).eval() for _ in range(2)]
    for t in teachers:
        t.decoder.deep_supervision = False
        t.requires_grad_(False)
    setups = {}
    for name, net in (("full", full), ("lora", adapted), ("medseqft", medseqft)):
        params = [p for p in net.parameters() if p.requires_grad]
        setups[name] = (net, torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5))
    loss_fn = _loss(base)
    x = torch.randn(args.batch, 1, *patch, device=device)
    buf = torch.randn(args.batch, 1, *patch, device=device)
    with torch.no_grad():
        targets = _targets(full(x))

    def step(name):
        net, opt = setups[name]
        opt.zero_grad(set_to_none=True)
        if name == "medseqft":
            out, feats = net(torch.cat((x, buf)), features=True)
            loss = loss_fn([o[: len(x)] for o in out], targets)
            kd = []
            for t in teachers:
                with torch.no_grad():
                    _, tf = unet_features(t, buf)
                kd.append(
                    torch.stack([nn.functional.mse_loss(s[len(x) :], f) for s, f in zip(feats, tf)]).mean()
                )
            loss = loss + torch.stack(kd).mean()
        else:
            loss = loss_fn(net(x), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 12)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in setups:  # warm-up + creates the optimizer state
        step(name)
    result = {"patch": patch, "batch": args.batch, "machine": machine_line()}
    for name, (net, opt) in setups.items():
        params = [p for p in net.parameters() if p.requires_grad]
        state = sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        )
        total = sum(p.numel() for p in (net.net if name == "medseqft" else net).parameters())
        result[name] = {
            "trainable": sum(p.numel() for p in params),
            "total": total,
            "grad_mb": sum(p.numel() * p.element_size() for p in params) / 2**20,
            "optimizer_state_mb": state / 2**20,
            "times": [],
            "cpu_times": [],
        }
    base_total = sum(p.numel() for p in base.parameters())
    for name in setups:
        result[name]["trainable_fraction"] = result[name]["trainable"] / base_total
    for _ in range(args.rounds):
        for name in ("full", "lora", "medseqft", "medseqft", "lora", "full"):
            start, cpu_start = time.perf_counter(), time.process_time()
            step(name)
            result[name]["times"].append(time.perf_counter() - start)
            result[name]["cpu_times"].append(time.process_time() - cpu_start)
    # on CPU the ratios use process CPU time (robust to other jobs on the machine), on GPU wall time
    key = "cpu_times" if device.type == "cpu" else "times"
    result["ratio_clock"] = "cpu" if device.type == "cpu" else "wall"
    for name in setups:
        result[name]["step_s"] = statistics.median(result[name]["times"])
        result[name]["step_cpu_s"] = statistics.median(result[name]["cpu_times"])
    pairs = list(zip(result["full"][key], result["lora"][key], result["medseqft"][key]))
    result["lora_over_full_time"] = statistics.median(b / a for a, b, _ in pairs)
    result["medseqft_over_full_time"] = statistics.median(c / a for a, _, c in pairs)
    print(f"\nmachine: {result['machine']}; patch {patch}, batch {args.batch}, {args.rounds} rounds")
    print(
        "| | trainable params | % of network | grads (MB) | optimizer state (MB) | train step (s, median) "
        "| CPU time per step (s, median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in setups:
        r = result[name]
        print(
            f"| {name} | {r['trainable']:,} | {100 * r['trainable_fraction']:.2f}% | {r['grad_mb']:.1f} | "
            f"{r['optimizer_state_mb']:.1f} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} |"
        )
    print(
        f"{result['ratio_clock']} time ratio (median of per-round ratios): "
        f"LoRA / full {result['lora_over_full_time']:.2f}, "
        f"MedSeqFT / full {result['medseqft_over_full_time']:.2f}"
    )
    return result


def saved_for_backward_mb(net: nn.Module, fn) -> float:
    """Activation memory of one training forward pass: the bytes of every tensor autograd saves for backward
    (unique storages; the network's own parameters excluded), in MB. Device independent, so it can be
    measured on CPU; peak training memory on a GPU is this plus weights, gradients, optimizer state and the
    transient buffers of the largest layer."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()) / 2**20


def memory(args) -> dict:
    """Activation memory of full fine-tuning (batch B) vs the MedSeqFT student over task + buffer patches
    (B + kd_batch_size, kd_batch_size in {B, 1}); the frozen teachers / expert run without gradients and save
    nothing."""
    from nnunet_ext.core import lora
    from nnunet_ext.medseqft.method import FeatureTap
    from nnunet_ext.trainers import nnUNetTrainerLoRA as T

    if args.plans:
        base, patch = plans_network(args.plans, args.configuration)
    else:
        base, patch = default_network(), list(args.patch)
    patch = list(args.patch) if args.patch else patch
    full = copy.deepcopy(base)
    adapted = copy.deepcopy(base)
    lora.inject_lora(
        adapted,
        lora.LoRAConfig(rank=T.lora_rank, alpha=T.lora_alpha, target=T.lora_target, exclude=T.lora_exclude),
    )
    lora.mark_trainable(adapted, T.lora_train_also)
    student = FeatureTap(adapted)
    b = args.batch
    result = {"patch": patch, "batch": b, "machine": machine_line(), "unit": "MB saved for backward"}
    result["full"] = saved_for_backward_mb(full, lambda: full(torch.randn(b, 1, *patch)))
    result["lora"] = saved_for_backward_mb(adapted, lambda: adapted(torch.randn(b, 1, *patch)))
    for kd in sorted({b, 1}, reverse=True):
        result[f"medseqft_kd{kd}"] = saved_for_backward_mb(
            student, lambda kd=kd: student(torch.randn(b + kd, 1, *patch), features=True)
        )
    print(f"\nmachine: {result['machine']}; patch {patch}, batch {b}: activation memory (saved for backward)")
    print("| step | patches in the forward pass | MB | x full fine-tuning |")
    print("|---|---|---|---|")
    rows = [("full fine-tuning", b, "full"), ("LoRA", b, "lora")]
    rows += [
        (f"MedSeqFT, kd_batch_size {kd}", b + kd, f"medseqft_kd{kd}") for kd in sorted({b, 1}, reverse=True)
    ]
    for label, n, key in rows:
        print(f"| {label} | {n} | {result[key]:.0f} | {result[key] / result['full']:.2f} |")
    return result


def _sh(cmd: list[str], env: dict) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=env, check=True)


def sequence(args) -> dict:
    work = Path(args.workdir).expanduser().resolve()
    env = dict(os.environ)
    for sub in ("raw", "preprocessed", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        env[f"nnUNet_{sub}"] = str(work / sub)
    from nnunet_ext import trainer_dir

    env.update(nnUNet_extTrainer=trainer_dir(), nnUNet_compile="f")
    os.environ.update(
        {k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile")}
    )
    from nnunet_ext.medseqft.method import write_task_phantoms
    from nnunet_ext.tools.phantoms import write_phantom_dataset

    pre = work / "preprocessed"
    ids = [args.first_id + i for i in range(4)]  # M_0's dataset, then the 3 tasks
    if not (pre / f"Dataset{ids[-1]:03d}_PhantomTaskSpleen").is_dir():
        write_phantom_dataset(
            work / "raw", ids[0], "full", num_train=args.cases, num_test=4, seed=100, force=True
        )
        write_task_phantoms(work / "raw", ids[1], num_train=args.cases, num_test=4, force=True)
        _sh(["nnUNetv2_plan_and_preprocess", "-d", *map(str, ids), "-c", "3d_fullres", "-np", "2"], env)
        for i in ids:
            _sh(["nnunet-ext", "plans", "tiny", str(i)], env)
    m0 = work / "results" / f"Dataset{ids[0]:03d}_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_tiny" / "fold_0"
    if not (m0 / "checkpoint_final.pth").is_file():
        from nnunetv2.run.run_training import maybe_load_checkpoint  # noqa: F401 (nnU-Net's path)

        from nnunet_ext.medseqft.run import _trainer

        os.environ["nnUNet_n_proc_DA"] = env.get("nnUNet_n_proc_DA", "2")
        trainer = _trainer(
            "nnUNetTrainer",
            f"Dataset{ids[0]:03d}_Phantom",
            "3d_tiny",
            0,
            "nnUNetPlans",
            torch.device(args.device),
        )
        trainer.num_epochs, trainer.num_iterations_per_epoch = args.m0_epochs, args.iterations
        trainer.num_val_iterations_per_epoch = max(1, args.iterations // 5)
        trainer.run_training()
    from nnunet_ext.medseqft.run import run_sequence

    start = time.perf_counter()
    run = f"run_{args.epochs}x{args.iterations}" + (f"_lora_lr{args.lora_lr:g}" if args.lora_lr else "")
    run += f"_kd{args.kd_weight:g}" if args.kd_weight is not None else ""
    run += f"_{args.tag}" if args.tag else ""
    result = run_sequence(
        m0 / "checkpoint_final.pth",
        ids[1:],
        "3d_tiny",
        work / run,
        schedule="full",
        epochs=args.epochs,
        iterations=args.iterations,
        device=args.device,
        views=args.views,
        lora_lr=args.lora_lr,
        kd_weight=args.kd_weight,
        strategies=tuple(args.strategies),
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["machine"] = machine_line()
    print(f"\nmachine: {result['machine']}; {args.epochs} epochs x {args.iterations} iterations per training")
    for name, entry in result["strategies"].items():
        print(
            f"{name}: final {entry['final']:.3f}, bwt {entry['bwt']:+.3f}, train {entry['train_seconds']} s"
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["efficiency", "memory", "sequence"], default=["efficiency"]
    )
    parser.add_argument(
        "--plans", default=None, help="efficiency: plans file (default: nnU-Net's default U-Net)"
    )
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument(
        "--patch", type=int, nargs=3, default=None, help="efficiency: patch (default 32 64 64)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="bench_medseqft")
    parser.add_argument("--first-id", type=int, default=940)
    parser.add_argument("--cases", type=int, default=12, help="sequence: training cases per dataset")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--m0-epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument(
        "--lora-lr", type=float, default=None, help="sequence: MedSeqFT's adapter learning rate"
    )
    parser.add_argument("--kd-weight", type=float, default=None, help="sequence: MedSeqFT's kd_weight")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["medseqft", "medseqft_noexpert", "sequential", "parallel"],
        help="sequence: strategies to train and compare",
    )
    parser.add_argument(
        "--tag", default="", help="sequence: suffix of the run folder (repeat a run: training is not seeded)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.patch is None and not args.plans:
        args.patch = [32, 64, 64]
    out = {}
    if "efficiency" in args.parts:
        out["efficiency"] = efficiency(args)
        for name in ("full", "lora", "medseqft"):
            out["efficiency"][name].pop("times", None)
            out["efficiency"][name].pop("cpu_times", None)
    if "memory" in args.parts:
        out["memory"] = memory(args)
    if "sequence" in args.parts:
        out["sequence"] = sequence(args)
    if args.json or "sequence" in args.parts:
        from nnunet_ext.core.io import atomic_write_json

        path = Path(args.json) if args.json else Path(args.workdir) / "bench_medseqft.json"
        atomic_write_json(path, out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
