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

SEQ_LENS = [7, 5]


def loss_and_grads(policy: Recompute | None):
    model = tiny_model(mtp=1).float().train()
    if policy is not None:
        apply_recompute(held_layers(model), policy)
    tokens = torch.arange(sum(SEQ_LENS)) % model.args.vocab_size
    hidden = model(tokens, ForwardBatch.training(SEQ_LENS))
    loss = model.logits(hidden).log_softmax(-1).mean()
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def checkpointed(module) -> bool:
    return isinstance(module.forward, functools.partial)


@pytest.mark.parametrize(
    "policy",
    [Recompute(), Recompute("full", "block", 2), Recompute("selective")],
    ids=["full-uniform-1", "full-block-2", "selective"],
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
    else:
        assert all(checkpointed(layer) for layer in layers)
    assert torch.equal(loss_rc, loss) and grads_rc.keys() == grads.keys()
    assert all(torch.equal(grads_rc[n], grads[n]) for n in grads)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(granularity="core"), "--recompute-granularity"),
        (dict(method="chunks"), "--recompute-method"),
        (dict(num_layers=0), "--recompute-num-layers"),
        (dict(num_layers=2), "uniform method"),
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
    result = CliRunner().invoke(app, ["train", "--dry-run", "--recompute-num-layers", "2"])
    assert result.exit_code == 1 and "uniform method" in result.stderr
