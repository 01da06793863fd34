"""The tiny character tokenizer: ids, round trips, the ChatML template, save and reload."""

from transformers import AutoTokenizer

from league.models.qwen3_5_moe.presets import PRESETS
from league.tokenizer import CHARACTERS, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB, build_tiny_tokenizer

TEXT = 'What is (12 + 7) * 3 / 4 - 5?\nAnswer: it\'s "about" 13.75; right! Zebra, quiz.'


def test_ids_and_specials():
    tok = build_tiny_tokenizer()
    assert len(tok) == len(VOCAB) and len(VOCAB) <= PRESETS["tiny"].vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == EOS_TOKEN_ID == PRESETS["tiny"].eos_token_id[0]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == PAD_TOKEN_ID
    ids = tok(CHARACTERS, add_special_tokens=False)["input_ids"]
    assert ids == list(range(len(CHARACTERS)))
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<think>", "</think>"]) == [
        VOCAB["<|im_start|>"],
        VOCAB["<think>"],
        VOCAB["</think>"],
    ]


def test_round_trip_and_chat_template(tmp_path):
    tok = build_tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT) and tok.decode(ids) == TEXT
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    full = prompt + "<think>easy</think>2<|im_end|>"
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(full_ids) == full
    assert tok.decode(full_ids, skip_special_tokens=True).endswith("assistant\n<think>easy</think>2")
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(full, add_special_tokens=False)["input_ids"] == full_ids and again.decode(full_ids) == full
    assert again.eos_token_id == EOS_TOKEN_ID and again.chat_template == tok.chat_template


def test_load_tokenizer_keeps_the_tiny_pipeline_beside_a_model_config(tmp_path):
    """In a checkpoint folder (a Qwen3.5-MoE config.json beside the tokenizer) the saved pipeline is what loads:
    newlines of the chat template stay tokens."""
    import json

    from league.checkpoint.hf import hf_config
    from league.models.qwen3_5_moe.presets import PRESETS
    from league.tokenizer import load_tokenizer

    tok = build_tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(PRESETS["tiny"])))
    again = load_tokenizer(tmp_path)
    text = "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(tmp_path / "missing") is None
