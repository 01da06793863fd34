"""Helpers for the checkpoint tests: tiny league models and rewrites of a checkpoint folder's layout."""

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from league.checkpoint.safetensors import iter_tensors, list_tensors
from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer
from tests.conftest import hf_text_config, randomize_vectors


def tiny_args(name: str = "gqa2_interval2", mtp: int = 1, **overrides) -> ModelArgs:
    config = hf_text_config(name, mtp_num_hidden_layers=mtp, **overrides).to_dict()
    return ModelArgs.from_hf_config(config).replace(dtype="float32")


def tiny_model(args: ModelArgs | None = None, seed: int = 0) -> Transformer:
    model = Transformer(args or tiny_args()).eval()
    model.init_weights(seed)
    randomize_vectors(model, seed)
    return model


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    return {info.name: tensor for info, tensor in iter_tensors(list_tensors(folder).values())}


def rewrite(folder: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of ``folder``'s non-weight files with ``tensors`` as its single model.safetensors."""
    out.mkdir(parents=True)
    for path in folder.iterdir():
        if not path.name.startswith("model"):
            shutil.copy2(path, out / path.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def split_experts(tensors: dict[str, torch.Tensor], trunk: bool = True, mtp: bool = True) -> dict[str, torch.Tensor]:
    """Fused ``mlp.experts.{gate_up,down}_proj`` -> per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``
    (the layout of Qwen3.5's ``mtp.*`` and of transformers' ``save_pretrained``), for the chosen parts."""
    out = {}
    for name, t in tensors.items():
        chosen = mtp if name.startswith("mtp.") else trunk
        if chosen and name.endswith("mlp.experts.gate_up_proj"):
            base, half = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :half].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, half:].clone()
        elif chosen and name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def assert_same_params(a: Transformer, b: Transformer) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def league_logits(model: Transformer, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.logits(model(torch.cat(seqs), ForwardBatch.packed([len(s) for s in seqs])))
    return list(out.split([len(s) for s in seqs]))


def random_seqs(vocab: int, lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
