"""Activation recompute as Megatron names it (full / uniform, full / block N, selective): each wraps the modules it
should, and the loss and every gradient equal those of the same step without recompute (fp32, CPU: bitwise)."""

import functools
import json

import pytest
import torch
from typer.testing import CliRunner

from league.cli import app
from league.models.qwen3_5_moe import ForwardBatch
from league.parallel.parallelize import held_layers
from league.parallel.recompute import Recompute, apply_recompute
from tests.models.test_forms import tiny_model
from tests.parallel.expect import step_equals_one_process

SEQ_LENS = [7, 5]


def loss_and_grads(policy: Recompute | None, saved: list | None = None):
    """One forward and backward of a tiny model (4 layers, MTP) under ``policy``; ``saved`` collects the bytes of
    every tensor the forward keeps for the backward."""
    model = tiny_model(mtp=1).float().train()
    if policy is not None:
        apply_recompute(held_layers(model), policy, model)
    tokens = torch.arange(sum(SEQ_LENS)) % model.args.vocab_size

    def keep(t: torch.Tensor) -> torch.Tensor:
        if saved is not None and not isinstance(t, torch.nn.Parameter):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        hidden = model(tokens, ForwardBatch.training(SEQ_LENS))
        loss = model.logits(hidden).log_softmax(-1).mean()
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def checkpointed(module) -> bool:
    return isinstance(module.forward, functools.partial)


@pytest.mark.parametrize(
    "policy",
    [Recompute(), Recompute("full", "uniform", 2), Recompute("full", "block", 2), Recompute("selective")],
    ids=["full-uniform-1", "full-uniform-2", "full-block-2", "selective"],
)
def test_recompute_keeps_the_loss_and_gradients(policy):
    _, loss, grads = loss_and_grads(None)
    model, loss_rc, grads_rc = loss_and_grads(policy)
    layers = held_layers(model)
    if policy.granularity == "selective":
        assert not any(checkpointed(layer) for layer in layers)
        assert all(checkpointed(layer.attn if layer.layer_type == "full_attention" else layer.gdn) for layer in layers)
    elif policy.method == "block":
        assert [checkpointed(layer) for layer in layers] == [i < 2 for i in range(len(layers))]
    elif policy.num_layers > 1:  # the trunk's runs through forward_layers; the MTP head's layer on its own
        assert [checkpointed(layer) for layer in layers] == [False] * len(model.layers) + [True]
        assert model.forward_layers.__name__ == "runs"
    else:
        assert all(checkpointed(layer) for layer in layers)
    assert torch.equal(loss_rc, loss) and grads_rc.keys() == grads.keys()
    assert all(torch.equal(grads_rc[n], grads[n]) for n in grads)


def test_uniform_runs_keep_fewer_activations():
    """What a training forward keeps for its backward (the tiny model's 4 layers, 12 tokens): every activation
    without recompute; each layer's input with one-layer units; each run's first input with runs of 2 and 4 (the
    output head and the MTP layer the same throughout)."""
    kept = {}
    for name, policy in [("none", None), ("1", Recompute()), ("2", Recompute("full", "uniform", 2))]:
        kept[name] = []
        loss_and_grads(policy, kept[name])
    kept["4"] = []
    loss_and_grads(Recompute("full", "uniform", 4), kept["4"])
    sizes = {name: sum(b) for name, b in kept.items()}
    assert sizes["none"] > sizes["1"] > sizes["2"] > sizes["4"]
    # one layer's input is 12 tokens x dim 64 in fp32: each merge of two units keeps one input fewer
    layer_input = sum(SEQ_LENS) * 64 * 4
    assert sizes["1"] - sizes["2"] == 2 * layer_input and sizes["2"] - sizes["4"] == layer_input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(granularity="core"), "--recompute-granularity"),
        (dict(method="chunks"), "--recompute-method"),
        (dict(num_layers=0), "--recompute-num-layers"),
    ],
)
def test_bad_recompute_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recompute(**kwargs)


def test_the_reference_recompute_flags_reach_the_config():
    args = ["train", "--dry-run", "--recompute-granularity", "full", "--recompute-method", "block"]
    result = CliRunner().invoke(app, [*args, "--recompute-num-layers", "3", "--run-dir", "/tmp/league-rc-unused"])
    train = json.loads(result.stdout)["train"]
    assert (train["recompute_granularity"], train["recompute_method"], train["recompute_num_layers"]) == (
        "full",
        "block",
        3,
    )
    result = CliRunner().invoke(app, ["train", "--dry-run", "--recompute-num-layers", "2", "--run-dir", "/tmp/x"])
    assert result.exit_code == 0 and json.loads(result.stdout)["train"]["recompute_num_layers"] == 2


@pytest.mark.xdist_group("world2")
@pytest.mark.parametrize("name", ["ep2_uniform2_train_step", "pp2_uniform2_train_step"])
def test_uniform_runs_across_ranks_equal_one_process(world2, name):
    """Runs of 2 layers under FSDP2 with experts over 2 ranks, and within 2 pipeline stages: one process's step."""
    step_equals_one_process(world2, name)
