"""One DDP rank of tests/core/test_lora.py's DDP test, in an importable module: the spawned ranks import their
target by module name, and test modules are not importable by name (pytest's importlib mode)."""

import copy

import torch

from nnunet_ext.core import lora
from support.lora_helpers import make_net


def ddp_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One DDP rank (gloo, CPU): the MedSeqFT step (LoRA network in FeatureTap, ONE forward over task + buffer
    batch, Dice-free seg loss + feature distillation against a frozen teacher), each rank on its own data."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_ext.medseqft.method import FeatureTap, unet_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = make_net("plain")  # same seed on every rank, as nnU-Net builds the network
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    teacher.decoder.deep_supervision = False
    lora.inject_lora(net, lora.LoRAConfig(rank=2))
    lora.mark_trainable(net)
    model = DDP(FeatureTap(net))  # what nnUNetTrainerMedSeqFT trains (device_ids: GPUs only)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9)
    torch.manual_seed(100 + rank)  # different data per rank
    data, buffer = torch.randn(2, 1, 8, 16, 16), torch.randn(2, 1, 8, 16, 16)
    target = torch.randint(0, 3, (2, 8, 16, 16))
    adapters = [p for n, p in net.named_parameters() if p.requires_grad and lora.is_adapter_parameter(n)]
    for _ in range(2):
        # MedSeqFT's per-term gradient norms: a side pass through the unwrapped module + autograd.grad must
        # leave DDP's reduction of the real step alone
        side_out, _ = model.module(torch.cat((data, buffer)), features=True)
        side = torch.autograd.grad(side_out[0][:2].square().mean(), adapters, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in side)
        opt.zero_grad(set_to_none=True)
        out, feats = model(torch.cat((data, buffer)), features=True)
        with torch.no_grad():
            _, t_feats = unet_features(teacher, buffer)
        kd = torch.stack([F.mse_loss(s[2:], t) for s, t in zip(feats, t_feats)]).mean()
        # every head in the loss, as nnU-Net's DDP loss does (lowest deep-supervision weight 1e-6, not 0)
        loss = F.cross_entropy(out[0][:2], target) + sum(1e-6 * o[:2].mean() for o in out[1:]) + kd
        loss.backward()
        opt.step()
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "merged": lora.merged_state_dict(net)}, out_file)
    dist.destroy_process_group()
