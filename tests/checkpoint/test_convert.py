"""`league convert` in one process: Hugging Face -> DCP -> Hugging Face is bit-exact (``mtp.*`` included) from both
expert layouts, the multimodal naming and bf16; ``--mtp-num-layers 0`` drops the MTP layer; reading is bucketed;
DCP metadata that would run code is refused. (Two ranks against one: ``tests/parallel/test_dcp_convert.py``.)"""

import filecmp
import json
import os
from unittest import mock

import pytest
import torch

from league.checkpoint import dcp
from league.checkpoint.convert import buckets, dcp_to_hf, hf_to_dcp, share_by_size
from league.checkpoint.hf import load_model, save_hf
from league.tokenizer import build_tiny_tokenizer
from tests.checkpoint.helpers import assert_same_params, read_folder, rewrite, split_experts, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny league model with an MTP head, saved by league (fused experts, one file) with a tokenizer."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("ckpt") / "hf"
    save_hf(model, folder, tokenizer_from=build_tiny_tokenizer())
    return model, folder


def same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def round_trip(folder, tmp_path, **options):
    hf_to_dcp(folder, tmp_path / "dcp", **options)
    return dcp_to_hf(tmp_path / "dcp", tmp_path / "back")


def test_hf_to_dcp_to_hf_is_bit_exact_mtp_included(saved, tmp_path):
    model, folder = saved
    back = round_trip(folder, tmp_path)
    assert same_files(folder, back)  # weights, config.json and tokenizer files, byte for byte
    names = dcp.list_tensors(tmp_path / "dcp")
    assert names.keys() == {f"model.{n}" for n, _ in model.named_parameters()}
    assert any(n.startswith("model.mtp.layers.0.moe.experts.") for n in names)
    assert {p.name for p in (tmp_path / "dcp").iterdir()} >= {"config.json", "tokenizer.json", ".metadata"}


@pytest.mark.parametrize("trunk, mtp", [(True, True), (True, False), (False, True)], ids=["all", "trunk", "mtp"])
def test_per_expert_layouts_convert_to_the_fused_tensors(saved, tmp_path, trunk, mtp):
    """Per-expert experts (Qwen3.5's ``mtp.*``, transformers' saves) come back fused: the tensors of the fused
    original, bit for bit."""
    _, folder = saved
    split = rewrite(folder, tmp_path / "split", split_experts(read_folder(folder), trunk=trunk, mtp=mtp))
    back = round_trip(split, tmp_path)
    original, converted = read_folder(folder), read_folder(back)
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) and original[k].dtype == converted[k].dtype for k in original)


@pytest.mark.parametrize("how", ["multimodal", "bfloat16"])
def test_naming_and_dtype_are_kept(saved, tmp_path, how):
    model, _ = saved
    options = {"text_prefix": "model.language_model."} if how == "multimodal" else {"dtype": "bfloat16"}
    folder = save_hf(model, tmp_path / "hf", **options)
    back = round_trip(folder, tmp_path)
    assert same_files(folder, back)
    dtypes = {e.dtype for e in dcp.list_tensors(tmp_path / "dcp").values()}
    assert dtypes == ({torch.bfloat16} if how == "bfloat16" else {torch.float32})


def test_mtp_num_layers_0_drops_the_mtp_layer(saved, tmp_path):
    model, folder = saved
    back = round_trip(folder, tmp_path, mtp_num_layers=0)
    assert not any(n.startswith("model.mtp.") for n in dcp.list_tensors(tmp_path / "dcp"))
    for where in ("dcp", "back"):
        assert json.loads((tmp_path / where / "config.json").read_text())["mtp_num_hidden_layers"] == 0
    assert not any(n.startswith("mtp.") for n in read_folder(back))
    trunk = load_model(back)
    assert trunk.mtp is None
    model_without = tiny_model()
    model_without.mtp = None
    assert_same_params(model_without, trunk)


def test_mtp_num_layers_must_be_0_or_the_checkpoints(saved, tmp_path):
    _, folder = saved
    with pytest.raises(ValueError, match=r"`--mtp-num-layers` 2 does not match the checkpoint's .* \(1\); give 0"):
        hf_to_dcp(folder, tmp_path / "dcp", mtp_num_layers=2)
    hf_to_dcp(folder, tmp_path / "kept", mtp_num_layers=1)
    assert any(n.startswith("model.mtp.") for n in dcp.list_tensors(tmp_path / "kept"))
    assert not (tmp_path / "dcp").exists()


def test_a_bad_checkpoint_writes_nothing(saved, tmp_path):
    _, folder = saved
    tensors = read_folder(folder)
    del tensors["model.layers.1.mlp.shared_expert.up_proj.weight"]
    broken = rewrite(folder, tmp_path / "broken", tensors)
    with pytest.raises(ValueError, match="missing from the checkpoint: model.layers.1.mlp.shared_expert.up_proj"):
        hf_to_dcp(broken, tmp_path / "dcp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_dcp_to_hf_reads_a_bucket_at_a_time(saved, tmp_path):
    """With 20 kB buckets the tiny model's 1.3 MB are read in many loads, none above the bucket unless it holds a
    single tensor; the output is the same."""
    _, folder = saved
    hf_to_dcp(folder, tmp_path / "dcp")
    loads = []

    def record(folder, tensors, *args, **kwargs):
        loads.append([t.numel() * t.element_size() for t in tensors.values()])
        return load(folder, tensors, *args, **kwargs)

    load = dcp.load_tensors
    with mock.patch.object(dcp, "load_tensors", record):
        dcp_to_hf(tmp_path / "dcp", tmp_path / "back", bucket_bytes=20_000)
    assert len(loads) > 10 and all(sum(sizes) <= 20_000 or len(sizes) == 1 for sizes in loads)
    assert same_files(folder, tmp_path / "back")


def test_buckets_and_shares():
    assert buckets([5, 5, 5, 20, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]
    # largest first, each to the least loaded rank: 9 -> 0, 5 -> 1, 4 -> 1, 3 -> 0 (a tie: the lower rank), 1 -> 1
    assert share_by_size([4, 9, 1, 5, 3], 2) == [1, 0, 1, 1, 0]
    assert share_by_size([4, 9], 1) == [0, 0]


class RunsCode:
    """Unpickling it makes a folder: what a hostile .metadata could do with any function."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_metadata_that_runs_code_is_refused(saved, tmp_path):
    _, folder = saved
    hf_to_dcp(folder, tmp_path / "dcp")
    marker = tmp_path / "ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(__import__("pickle").dumps(RunsCode(str(marker))))
    with pytest.raises(ValueError, match=r"refused to unpickle \(posix.mkdir .*pass --load-unsafe-pickle"):
        dcp_to_hf(tmp_path / "dcp", tmp_path / "back")
    assert not marker.exists() and not (tmp_path / "back").exists()
    with pytest.raises(ValueError, match="not DCP metadata"):  # the flag trusts the file, and runs its code
        dcp_to_hf(tmp_path / "dcp", tmp_path / "back", unsafe_pickle=True)
    assert marker.is_dir()
