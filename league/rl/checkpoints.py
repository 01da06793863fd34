"""A run's checkpoints: what one holds, saving it by every rank together, building the policy from one, resuming.

A checkpoint is a folder ``root/step_00000k`` (``root/latest`` names the newest) in torch.distributed.checkpoint's
format (``checkpoint.dcp``), the same at any number of ranks:

- tensors ``model.<name>`` (the policy), ``ref.<name>`` (the KL reference, when the run has one) and
  ``optimizer.{master,exp_avg,exp_avg_sq,step}.<name>`` (``Optimizer.state_dict``), each saved as the ranks hold it
  (a sharded parameter as its shards, with its global shape), so a run saved at N ranks resumes at M;
- ``train_state.json``: the rollout step, the optimizer's step count, the prompt sampler's position and each rank's
  RNG states (torch and Python), as plain JSON;
- ``config.json`` (the policy's architecture) and the tokenizer's files: the folder alone builds the policy, and
  ``league convert dcp-to-hf`` makes a Hugging Face folder of it (no Hugging Face copy is kept, as Megatron's
  torch_dist checkpoints keep none).

A folder made by ``league convert hf-to-dcp`` holds ``model.*``, config.json and the tokenizer, and no train state: a
run loading it starts at step 0 from its weights.

Not responsible for DCP's mechanics (``checkpoint.dcp``) nor for when a run saves (``rl.loop``).
"""

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from league.checkpoint import dcp
from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.parallel.launch import Ranks

TRAIN_STATE = "train_state.json"
MODEL, REF, OPTIMIZER = "model", "ref", "optimizer"
"""Prefixes of the checkpoint's tensor names."""


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters by name, detached (sharing their memory: a load fills them in place)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def save_checkpoint(
    root: Path,
    step: int,
    model: Transformer,
    trainer,
    sampler,
    tokenizer,
    ranks: Ranks | None = None,
    keep_last: int | None = None,
) -> Path:
    """``root/step_{step + 1:06d}`` after rollout step ``step`` (see the module docstring), saved by every rank of
    ``ranks`` together; returns the folder. It is written into a staging folder that is renamed only when every rank
    succeeded (a failed write, such as a full disk, removes it and raises on every rank), then ``root/latest`` is
    pointed at it and, with ``keep_last``, older folders are pruned (:func:`prune_checkpoints`). An earlier folder of
    the same step is replaced."""
    ranks = ranks or Ranks()
    from league.checkpoint.hf import copy_tokenizer, hf_config, saved_args, write_config

    state = {
        "step": step,
        "optimizer_steps": trainer.num_steps,
        "sampler": sampler.state_dict(),
        "rng": ranks.gather_blocks([rng_state()]),
    }
    tensors = {**prefixed(MODEL, parameters(model)), **prefixed(OPTIMIZER, trainer.optimizer.state_dict())}
    if trainer.ref_model is not None:
        tensors.update(prefixed(REF, parameters(trainer.ref_model)))
    final = root / f"step_{step + 1:06d}"
    with dcp.staged_together(final, ranks.group, force=True) as stage:
        dcp.save_tensors(stage, tensors, ranks.group)
        if ranks.main:
            write_config(stage, hf_config(saved_args(model)))
            copy_tokenizer(tokenizer, stage)
            (stage / TRAIN_STATE).write_text(json.dumps(state) + "\n")
    dcp.on_main(ranks.group, lambda: _point_latest(root, final.name, keep_last))
    return final


def _point_latest(root: Path, name: str, keep_last: int | None) -> None:
    staged = root / (dcp.LATEST + ".tmp")
    staged.write_text(name + "\n")
    staged.replace(root / dcp.LATEST)
    if keep_last:
        prune_checkpoints(root, keep_last)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` highest-numbered ``step_*`` folders of ``root``, never the one ``latest``
    names; returns the deleted folders. One process does it (rank 0 of a run)."""
    latest = (root / dcp.LATEST).read_text().strip() if (root / dcp.LATEST).is_file() else None
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    steps.sort(key=lambda p: int(p.name.removeprefix("step_")))
    deleted = [p for p in steps[:-keep_last] if p.name != latest]
    for folder in deleted:
        shutil.rmtree(folder)
    return deleted


def load_policy(
    load: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    mtp_num_layers: int | None = None,
    unsafe_pickle: bool = False,
    on_meta: bool = False,
) -> tuple[Transformer, Any]:
    """The policy of a checkpoint (``--load``): its config.json's architecture (without the MTP head when
    ``mtp_num_layers`` is 0), its ``model.*`` weights read whole by this process, and its tokenizer. ``on_meta``:
    the policy on the meta device, weights not read (the ranks place it first, then each reads its shards:
    :func:`load_shards`)."""
    from league.checkpoint.hf import empty_model, meta_model
    from league.tokenizer import load_tokenizer

    folder = dcp.find_checkpoint(load)
    args = ModelArgs.from_dir(folder)
    if mtp_num_layers == 0:
        args = args.replace(mtp_num_layers=0)
    if on_meta:
        return meta_model(args, dtype), load_tokenizer(folder)
    model = empty_model(args, device, dtype)
    dcp.load_tensors(folder, prefixed(MODEL, parameters(model)), unsafe_pickle=unsafe_pickle)
    return model, load_tokenizer(folder)


def load_shards(
    load: str | Path, models: list[nn.Module], ranks: Ranks | None = None, unsafe_pickle: bool = False
) -> None:
    """Fill each of ``models`` (the policy, and its copies such as the KL reference: placed for the ranks, maybe
    sharded or a pipeline stage's part, allocated) with the checkpoint's ``model.*`` weights, every rank reading only
    what it holds. Every rank of ``ranks`` calls it together."""
    ranks = ranks or Ranks()
    folder = dcp.find_checkpoint(load)
    for model in models:
        dcp.load_tensors(folder, prefixed(MODEL, parameters(model)), ranks.group, unsafe_pickle)


def resume(load: str | Path, trainer, sampler, ranks: Ranks | None = None, unsafe_pickle: bool = False) -> int:
    """Continue the run whose checkpoint is ``load`` (the policy's weights were read by :func:`load_policy`): the
    optimizer's state, the KL reference (when both the run and the checkpoint have one; otherwise it stays the
    loaded policy), the step counts, the sampler's position and this rank's RNG states (rank r takes those saved by
    rank r modulo the saving world). Every rank of ``ranks`` calls it together. Returns the first rollout step to run:
    0 for a checkpoint without train state (``league convert hf-to-dcp``), which changes nothing here."""
    ranks = ranks or Ranks()
    folder = dcp.find_checkpoint(load)
    if not (folder / TRAIN_STATE).is_file():
        return 0
    state = read_train_state(folder / TRAIN_STATE)
    optimizer_state = trainer.optimizer.state_dict()
    tensors = prefixed(OPTIMIZER, optimizer_state)
    saved = dcp.list_tensors(folder, unsafe_pickle)
    if trainer.ref_model is not None and any(name.startswith(REF + ".") for name in saved):
        tensors.update(prefixed(REF, parameters(trainer.ref_model)))
    dcp.load_tensors(folder, tensors, ranks.group, unsafe_pickle)
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.num_steps = state["optimizer_steps"]
    sampler.load_state_dict(state["sampler"])
    restore_rng(state["rng"][ranks.rank % len(state["rng"])])
    return state["step"] + 1


def read_train_state(path: Path) -> dict[str, Any]:
    """``train_state.json``, checked for the fields :func:`resume` reads."""
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"`--load` {path}: not valid JSON ({e})") from None
    fields = {"step": int, "optimizer_steps": int, "sampler": dict, "rng": list}
    if not isinstance(state, dict):
        state = {}
    wrong = [name for name, kind in fields.items() if not isinstance(state.get(name), kind)]
    if wrong or not state["rng"]:
        raise ValueError(f"`--load` {path}: not a league train state (missing or malformed: {wrong or ['rng']})")
    return state


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU) and Python RNG states as JSON values."""
    version, words, gauss = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [version, list(words), gauss],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
