"""The optimizer's fp32 master weights: bf16 parameters keep updates smaller than their precision, on their own
device and with CPU offload, and the two give the same parameters; its state saved and loaded continues exactly."""

import dataclasses

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_masters"])
def test_state_dict_continues_exactly(dtype):
    """A fresh optimizer loaded with another's state (masters, moments, step counts; a copy of it) takes the same
    next steps bit for bit; a parameter that had no gradient yet has zero moments and step 0, as Adam starts."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 8, generator=gen) for _ in range(4)]

    def setup():
        params = [("w", torch.nn.Parameter(torch.ones(4, 8, dtype=dtype))), ("idle", torch.nn.Parameter(torch.ones(3)))]
        return params, Optimizer(params, OptimConfig(lr=1e-2, weight_decay=0.1))

    def step(params, opt, grad):
        params[0][1].grad = grad.to(dtype)
        opt.step(lr=1e-2)

    params, opt = setup()
    for grad in grads[:2]:
        step(params, opt, grad)
    state = {name: t.clone() for name, t in opt.state_dict().items()}
    assert set(state) == {f"{kind}.{n}" for kind in ("master", "exp_avg", "exp_avg_sq", "step") for n in ("w", "idle")}
    assert state["step.w"].item() == 2 and state["step.idle"].item() == 0 and not state["exp_avg.idle"].any()
    assert state["master.w"].dtype == torch.float32
    resumed, resumed_opt = setup()
    resumed_opt.load_state_dict(state)
    assert torch.equal(resumed[0][1], params[0][1])
    for grad in grads[2:]:
        step(params, opt, grad)
        step(resumed, resumed_opt, grad)
        assert torch.equal(resumed[0][1], params[0][1]) and torch.equal(resumed_opt.masters[0], opt.masters[0])


def adamw_inputs(device: str, steps: int = 5):
    """Parameters of each kind (bf16 matrix and vector, an fp32 vector, a matrix without a gradient every other
    step) and each step's bf16 gradients, of magnitudes from 1e-3 to 10."""
    gen = torch.Generator().manual_seed(0)
    shapes = [((37, 19), torch.bfloat16), ((53,), torch.bfloat16), ((11,), torch.float32), ((8, 24), torch.bfloat16)]
    params = [torch.randn(s, generator=gen).to(dtype) for s, dtype in shapes]
    grad = lambda p, step: (torch.randn(p.shape, generator=gen) * 10.0 ** (step % 5 - 3)).to(p.dtype)
    grads = [[None if i == 3 and step % 2 else grad(p, step) for i, p in enumerate(params)] for step in range(steps)]
    move = lambda t: None if t is None else t.to(device)
    return [move(p) for p in params], [[move(g) for g in step] for step in grads]


def reference_adamw(params, grads, config: OptimConfig, lrs):
    """The optimizer written out plainly: clip the gradients, convert each to fp32, torch's for-each AdamW on fp32
    masters (matrices decayed), round the masters into the parameters."""
    masters = [p.float().clone() for p in params]
    inner = torch.optim.AdamW(
        [
            {"params": [m for p, m in zip(params, masters) if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [m for p, m in zip(params, masters) if p.ndim < 2], "weight_decay": 0.0},
        ],
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        foreach=True,
    )
    for step_grads, lr in zip(grads, lrs):
        live = [g.clone() for g in step_grads if g is not None]
        torch.nn.utils.clip_grads_with_norm_(live, config.clip_grad, torch.nn.utils.get_total_norm(live))
        live = iter(live)
        for m, g in zip(masters, step_grads):
            m.grad = None if g is None else next(live).float()
        for group in inner.param_groups:
            group["lr"] = lr
        inner.step()
    return masters, [m.to(p.dtype) for p, m in zip(params, masters)]


@pytest.mark.parametrize(
    "device,fused",
    [("cpu", None), ("cpu", True)]
    + [pytest.param("cuda", None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_step_equals_for_each_adamw_on_fp32_masters(device, fused):
    """Five steps with clipping on, weight decay on matrices, an fp32 parameter beside bf16 ones and a gradient
    missing every other step. CPU by default: bitwise the reference (torch's CPU AdamW; the for-each copies are
    exact conversions). The fused kernel (CUDA's default, or forced on the CPU) orders its fp32 arithmetic
    otherwise: its masters stay within a few fp32 ulps of the reference's (relative 2**-21, plus as many ulps of an
    lr-sized update for masters near 0), and the bf16 parameters are those masters rounded."""
    params, grads = adamw_inputs(device)
    config = OptimConfig(lr=1e-2, weight_decay=0.1, adam_beta2=0.98, clip_grad=1.0)
    lrs = [1e-2 * (step + 1) / 5 for step in range(len(grads))]
    ref_masters, ref_params = reference_adamw(params, grads, config, lrs)
    named = [(f"p{i}", torch.nn.Parameter(p.clone())) for i, p in enumerate(params)]
    opt = Optimizer(named, config, fused=fused)
    assert opt.inners[0].defaults["fused"] == (fused or device == "cuda")
    for step_grads, lr in zip(grads, lrs):
        for (_, p), g in zip(named, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step(lr)
    for master, ref, (_, p), ref_p in zip(opt.masters, ref_masters, named, ref_params):
        assert master.dtype == torch.float32 and p.dtype == ref_p.dtype
        if device == "cpu" and not fused:
            assert torch.equal(master, ref) and torch.equal(p.detach(), ref_p)
        else:
            torch.testing.assert_close(master, ref, rtol=2**-21, atol=1e-2 * 2**-21)
            assert torch.equal(p.detach(), master.to(p.dtype))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]
)
def test_overlapped_offload_steps_in_buckets_with_the_same_numbers(device):
    """``--overlap-cpu-optimizer-d2h-h2d``: the offloaded step in buckets of at most 40 elements (several buckets,
    one parameter larger than a bucket alone), each updated as its gradients arrive and copied back while the next
    updates, gives bitwise the masters and parameters of the reference; its state saves and loads as the one-bucket
    optimizer's. On CUDA (pinned host buffers, side streams) it equals the offloaded step without overlap."""
    params, grads = adamw_inputs(device)
    config = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=1.0, optimizer_cpu_offload=True)
    overlapped = dataclasses.replace(config, overlap_cpu_optimizer_d2h_h2d=True)
    lrs = [1e-2] * len(grads)
    runs = {}
    for name, cfg in (("plain", config), ("overlap", overlapped)):
        named = [(f"p{i}", torch.nn.Parameter(p.clone())) for i, p in enumerate(params)]
        opt = Optimizer(named, cfg, bucket_elements=40)
        for step_grads, lr in zip(grads, lrs):
            for (_, p), g in zip(named, step_grads):
                p.grad = None if g is None else g.clone()
            opt.step(lr)
        runs[name] = (opt, named)
    opt, named = runs["overlap"]
    sizes = [[opt.masters[i].numel() for i in bucket] for bucket in opt.buckets]
    assert len(opt.buckets) > 1 and all(sum(b) <= 40 or len(b) == 1 for b in sizes)
    assert all(m.device.type == "cpu" for m in opt.masters)
    assert opt.inners[0].defaults["fused"] == (device == "cuda")  # offloaded from CUDA: torch's fused CPU AdamW
    ref_masters, ref_params = runs["plain"][0].masters, [p.detach() for _, p in runs["plain"][1]]
    if device == "cpu":  # and the plain offloaded step is torch's CPU AdamW on fp32 masters
        assert all(torch.equal(m, r) for m, r in zip(ref_masters, reference_adamw(params, grads, config, lrs)[0]))
    assert all(torch.equal(m, r) for m, r in zip(opt.masters, ref_masters))
    assert all(torch.equal(p.detach(), r) for (_, p), r in zip(named, ref_params))
    plain_state, state = runs["plain"][0].state_dict(), opt.state_dict()
    assert plain_state.keys() == state.keys() and all(torch.equal(plain_state[k], state[k]) for k in state)
    fresh = Optimizer([(n, torch.nn.Parameter(torch.zeros_like(p))) for n, p in named], overlapped, bucket_elements=40)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(a, b) for a, b in zip(fresh.masters, opt.masters))
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)


def test_precision_aware_optimizer_is_fp32_adam_on_masters():
    """``--use-precision-aware-optimizer`` with the reference's dtypes (all fp32): bf16 parameters step as fp32
    AdamW on fp32 masters does, rounded (bitwise on the CPU); lower-precision state is refused by name."""
    params, grads = adamw_inputs("cpu")
    config = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=1.0, use_precision_aware_optimizer=True)
    lrs = [1e-2] * len(grads)
    ref_masters, ref_params = reference_adamw(params, grads, config, lrs)
    named = [(f"p{i}", torch.nn.Parameter(p.clone())) for i, p in enumerate(params)]
    opt = Optimizer(named, config)
    for step_grads, lr in zip(grads, lrs):
        for (_, p), g in zip(named, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step(lr)
    assert all(s.dtype == torch.float32 for state in opt.inners[0].state.values() for s in state.values() if s.ndim)
    assert all(torch.equal(m, r) for m, r in zip(opt.masters, ref_masters))
    assert all(torch.equal(p.detach(), r) for (_, p), r in zip(named, ref_params))
    with pytest.raises(ValueError, match="`--exp-avg-dtype` bf16: league's optimizer keeps fp32"):
        OptimConfig(use_precision_aware_optimizer=True, exp_avg_dtype="bf16")
    with pytest.raises(ValueError, match="needs `--use-precision-aware-optimizer`"):
        OptimConfig(main_grads_dtype="bf16")
