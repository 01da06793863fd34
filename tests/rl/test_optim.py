"""The optimizer's fp32 master weights: bf16 parameters keep updates smaller than their precision, on their own
device and with CPU offload, and the two give the same parameters."""

import pytest
import torch

from league.rl.optim import OptimConfig, Optimizer


def train_bf16(offload: bool, steps: int = 20) -> tuple[torch.Tensor, Optimizer]:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.full((4, 8), 1.0, dtype=torch.bfloat16))
    opt = Optimizer(
        [("w", weight)], OptimConfig(lr=1e-4, weight_decay=0.0, clip_grad=0.0, optimizer_cpu_offload=offload)
    )
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        opt.step(lr=1e-4)
    return weight, opt


@pytest.mark.parametrize("offload", [False, True])
def test_bf16_parameters_accumulate_small_updates_in_fp32_masters(offload):
    """Adam's first steps move each weight by about lr = 1e-4, below bf16's spacing at 1.0 (2**-7): without a master
    copy the weight would stay 1.0; with one, 20 steps reach 1 - 20e-4, which rounds to the bf16 value below 1."""
    weight, opt = train_bf16(offload)
    assert opt.use_masters and opt.masters[0].dtype == torch.float32
    assert opt.masters[0].sub(1.0 - 20e-4).abs().max().item() < 1e-6
    assert torch.equal(weight.detach(), opt.masters[0].to(torch.bfloat16))
    assert weight.detach().max().item() < 1.0


def test_offload_and_on_device_masters_agree():
    on_device, _ = train_bf16(offload=False)
    offloaded, _ = train_bf16(offload=True)
    assert torch.equal(on_device.detach(), offloaded.detach())


def test_fp32_parameters_step_in_place_without_copies():
    weight = torch.nn.Parameter(torch.ones(3, 3))
    opt = Optimizer([("w", weight)], OptimConfig(lr=1e-2, weight_decay=0.0))
    assert not opt.use_masters and opt.masters[0] is weight
    weight.grad = torch.ones_like(weight)
    opt.step(lr=1e-2)
    assert weight.detach().max().item() < 1.0
