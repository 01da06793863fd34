"""Hugging Face checkpoint folders in and out: parity with transformers both ways, the multimodal naming,
fused and per-expert expert layouts (trunk and ``mtp.*``), sharding, and bad checkpoints."""

import copy
import json
import logging
import warnings

import pytest
import torch
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration

from league.checkpoint.hf import LoadReport, load_hf_weights, load_model, save_hf
from league.checkpoint.qwen3_5_moe import from_hf, to_hf
from league.checkpoint.safetensors import INDEX_FILE, SINGLE_FILE, list_tensors
from league.models.qwen3_5_moe import ModelArgs, Transformer
from tests.checkpoint.helpers import (
    assert_same_params,
    league_logits,
    random_seqs,
    read_folder,
    rewrite,
    split_experts,
    tiny_args,
    tiny_model,
)
from tests.conftest import hf_text_config, randomize_vectors

LENGTHS = [70, 9]  # two GDN chunks, and a short one


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny league model with an MTP head, saved by league (fused experts, one file)."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("ckpt") / "league"
    save_hf(model, folder)
    return model, folder


def test_league_save_then_transformers_load_gives_the_same_logits(tmp_path):
    model = tiny_model(tiny_args("gqa4_interval4"))
    folder = save_hf(model, tmp_path / "sharded", max_shard_bytes=100_000)
    assert (folder / INDEX_FILE).is_file() and len(list(folder.glob("model-*-of-*.safetensors"))) > 3
    names = list_tensors(folder)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "mtp.layers.0.mlp.experts.down_proj" in names
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"
    hf, info = Qwen3_5MoeForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert hf.dtype == torch.float32
    seqs = random_seqs(model.args.vocab_size, LENGTHS)
    with torch.no_grad():
        for seq, ours in zip(seqs, league_logits(model, seqs)):
            assert (hf.eval()(seq[None]).logits[0] - ours).abs().max().item() < 1e-5


def test_transformers_save_then_league_load_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    hf = Qwen3_5MoeForCausalLM(hf_text_config("mha_pattern")).eval()
    randomize_vectors(hf)
    hf.save_pretrained(tmp_path)
    # transformers writes experts one by one, so this also exercises the per-expert layout
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in list_tensors(tmp_path)
    model = load_model(tmp_path)
    assert model.mtp is None and model.args.layer_types == ["full_attention", "linear_attention", "full_attention"]
    seqs = random_seqs(model.args.vocab_size, LENGTHS)
    with torch.no_grad():
        for seq, ours in zip(seqs, league_logits(model, seqs)):
            assert (hf(seq[None]).logits[0] - ours).abs().max().item() < 1e-5


def test_multimodal_checkpoint_loads_the_text_path(tmp_path, caplog):
    torch.manual_seed(0)
    config = Qwen3_5MoeConfig(
        text_config=hf_text_config("gqa2_interval2").to_dict(),
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64},
    )
    hf = Qwen3_5MoeForConditionalGeneration(config).eval()
    randomize_vectors(hf)
    hf.save_pretrained(tmp_path)
    names = list_tensors(tmp_path)
    assert any(n.startswith("model.visual.") for n in names)
    assert "model.language_model.embed_tokens.weight" in names
    model = Transformer(ModelArgs.from_dir(tmp_path)).eval()
    with caplog.at_level(logging.INFO, logger="league.checkpoint.hf"), warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_hf_weights(model, tmp_path)
    visual = sum(n.startswith("model.visual.") for n in names)
    assert report.text_prefix == "model.language_model." and report.num_skipped_visual == visual
    assert report.unexpected == [] and report.num_loaded == len(names) - visual
    assert f"skipped {visual} vision-tower tensors" in caplog.text
    seqs = random_seqs(model.args.vocab_size, LENGTHS)
    with torch.no_grad():
        for seq, ours in zip(seqs, league_logits(model, seqs)):
            assert (hf(input_ids=seq[None]).logits[0] - ours).abs().max().item() < 1e-5


def test_multimodal_naming_round_trips(saved, tmp_path):
    model, _ = saved
    folder = save_hf(model, tmp_path / "mm", text_prefix="model.language_model.")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["text_config"]["model_type"] == "qwen3_5_moe_text"
    names = list_tensors(folder)
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith("model.layers.") for n in names)
    assert_same_params(model, load_model(folder))


@pytest.mark.parametrize("trunk, mtp", [(True, True), (True, False), (False, True)], ids=["all", "trunk", "mtp"])
def test_per_expert_and_fused_layouts_load_identically(saved, tmp_path, trunk, mtp):
    """Qwen3.6 ships fused ``mtp.*`` experts, Qwen3.5 per-expert ones; derived checkpoints split the trunk's."""
    model, folder = saved
    tensors = split_experts(read_folder(folder), trunk=trunk, mtp=mtp)
    assert ("mtp.layers.0.mlp.experts.7.down_proj.weight" in tensors) == mtp
    assert ("model.layers.0.mlp.experts.0.gate_proj.weight" in tensors) == trunk
    assert_same_params(model, load_model(rewrite(folder, tmp_path / "split", tensors)))


def test_league_round_trip_is_bit_exact_mtp_included(saved, tmp_path):
    model, folder = saved
    loaded = load_model(folder)
    assert_same_params(model, loaded)
    assert any(n.startswith("mtp.") for n, _ in loaded.named_parameters())
    # bfloat16 on disk, loaded as bfloat16 and as float32
    bf16 = save_hf(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert {info.dtype for info in list_tensors(bf16).values()} == {"BF16"}
    half = load_model(bf16)
    assert half.tok_embeddings.weight.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32
    assert torch.equal(half.inv_freq, model.inv_freq)
    assert_same_params(copy.deepcopy(model).to(torch.bfloat16), half)
    assert_same_params(half.float(), load_model(bf16, dtype=torch.float32))


def test_adapter_round_trips_bit_exactly(saved):
    model, _ = saved
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "inv_freq"}
    back = from_hf(to_hf(sd), model.args.moe_intermediate_size, model.args.num_experts)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_a_model_without_mtp_skips_mtp_tensors_quietly(saved):
    _, folder = saved
    model = Transformer(tiny_args(mtp=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_hf_weights(model, folder)
    assert report.num_skipped_mtp > 0 and report.unexpected == []


def test_unknown_tensors_are_ignored_with_a_warning(saved, tmp_path):
    model, folder = saved
    tensors = {**read_folder(folder), "model.layers.0.extra.weight": torch.zeros(3), "something.else": torch.zeros(1)}
    with pytest.warns(UserWarning, match=r"ignored 2 tensors .*model\.layers\.0\.extra\.weight"):
        loaded = load_model(rewrite(folder, tmp_path / "extra", tensors))
    assert_same_params(model, loaded)


def test_config_errors_name_the_file(saved, tmp_path):
    _, folder = saved
    empty = tmp_path / "no_config"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty / 'config.json'}: no such file"):
        load_model(empty)
    broken = rewrite(folder, tmp_path / "broken", read_folder(folder))
    (broken / "config.json").write_text('{"model_type": "qwen3_5_moe_text", ')
    with pytest.raises(ValueError, match=f"{broken / 'config.json'}: not valid JSON"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=f"{broken / 'config.json'}: model_type 'llama' is not supported"):
        load_model(broken)


def test_missing_weights_are_named(saved, tmp_path):
    model, folder = saved
    tensors = read_folder(folder)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(
        ValueError,
        match=r"1 tensors .* missing .*model\.layers\.1\.self_attn\.k_norm\.weight "
        r"\(layers\.1\.attn\.k_norm\.weight\)",
    ):
        load_model(rewrite(folder, tmp_path / "a", tensors))
    per_expert = split_experts(read_folder(folder))
    del per_expert["mtp.layers.0.mlp.experts.5.up_proj.weight"]
    with pytest.raises(
        ValueError,
        match=r"mtp\.layers\.0\.mlp\.experts\.5\.up_proj\.weight "
        r"\(mtp\.layers\.0\.moe\.experts\.w_gate_up\[5\]\)",
    ):
        load_model(rewrite(folder, tmp_path / "b", per_expert))
    no_mtp = {k: v for k, v in read_folder(folder).items() if not k.startswith("mtp.")}
    with pytest.raises(ValueError, match=r"tensors the config needs are missing.*mtp\.fc\.weight"):
        load_model(rewrite(folder, tmp_path / "c", no_mtp))


def test_wrong_shape_is_named_with_file_and_shapes(saved, tmp_path):
    model, folder = saved
    tensors = read_folder(folder)
    tensors["model.layers.0.linear_attn.in_proj_z.weight"] = torch.zeros(5, 64)
    bad = rewrite(folder, tmp_path / "bad", tensors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = list(model.layers[0].gdn.w_z.weight.shape)
    with pytest.raises(ValueError) as info:
        load_hf_weights(model, bad)
    message = str(info.value)
    assert str(bad / SINGLE_FILE) in message and "model.layers.0.linear_attn.in_proj_z.weight" in message
    assert "[5, 64]" in message and f"expected {expected}" in message
    # checked before any copy: the model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_report_counts(saved):
    model, folder = saved
    report = load_hf_weights(Transformer(model.args), folder)
    assert isinstance(report, LoadReport) and report.text_prefix == "model."
    assert report.num_loaded == len(list(model.parameters())) and report.num_skipped_visual == 0


def test_fused_and_per_expert_copies_of_one_weight_are_refused(saved, tmp_path):
    _, folder = saved
    fused = read_folder(folder)
    both = {
        **fused,
        **split_experts({"model.layers.0.mlp.experts.down_proj": fused["model.layers.0.mlp.experts.down_proj"]}),
    }
    with pytest.raises(ValueError, match=r"duplicates weights already given for layers\.0\.moe\.experts\.w_down"):
        load_model(rewrite(folder, tmp_path / "both", both))


def test_tokenizer_files_travel_with_the_checkpoint(saved, tmp_path):
    from transformers import AutoTokenizer

    from league.tokenizer import build_tiny_tokenizer

    model, _ = saved
    first = save_hf(model, tmp_path / "a", tokenizer_from=build_tiny_tokenizer())
    second = save_hf(model, tmp_path / "b", tokenizer_from=first)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in second.iterdir()}
    assert AutoTokenizer.from_pretrained(second)("1+1")["input_ids"] == [1, 10, 1]
    with pytest.raises(ValueError, match="no tokenizer files"):
        save_hf(model, tmp_path / "c", tokenizer_from=tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
