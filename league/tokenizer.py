"""The tiny character-level tokenizer that goes with the ``tiny`` model preset.

One token per character (digits, arithmetic and punctuation marks, a-z, A-Z, space, newline) plus the
Qwen chat specials, so that everything league does with a real Qwen tokenizer (chat template, eos, pad,
``<think>`` markers) can be tried with no download. :func:`load_tokenizer` reads any checkpoint folder's
tokenizer, this one included.
"""

import json
from pathlib import Path

CHARACTERS = "0123456789" + "+-*/=().,:;?!'\"" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + " \n"
"""The ordinary tokens, one per character, ids ``0 .. len(CHARACTERS) - 1`` in this order."""

PAD_TOKEN = "<|endoftext|>"
BOS_CHAT_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
THINK_TOKENS = ("<think>", "</think>")
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN, *THINK_TOKENS, UNK_TOKEN)
"""Tokens after the characters, in id order. ``<think>``/``</think>`` are kept by
``decode(skip_special_tokens=True)``, as in Qwen's tokenizer; the others are special."""

VOCAB: dict[str, int] = {token: i for i, token in enumerate([*CHARACTERS, *SPECIAL_TOKENS])}
EOS_TOKEN_ID = VOCAB[EOS_TOKEN]
PAD_TOKEN_ID = VOCAB[PAD_TOKEN]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen-style ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n`` when a generation prompt is asked for."""


def build_tiny_tokenizer():
    """The tiny tokenizer as a ``transformers`` fast tokenizer (``save_pretrained`` writes it to a folder).

    Characters outside :data:`CHARACTERS` encode as ``<|unk|>``. Decoding joins the tokens with nothing
    between them, so ``decode(encode(text)) == text`` for text made of known characters and specials.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(VOCAB), unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    special = [PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN, UNK_TOKEN]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""``tokenizer_class`` values of a tokenizer saved as a plain ``tokenizers`` pipeline (as the tiny one is)."""


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds a tokenizer's files."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return any((Path(folder) / name).is_file() for name in names)


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in a checkpoint folder, or None when the folder holds none.

    A folder whose ``tokenizer_config.json`` names a generic class gets exactly the saved ``tokenizer.json``
    pipeline: ``AutoTokenizer`` would pick the class of the model type (``Qwen3_5Tokenizer`` for a Qwen3.5-MoE
    config), whose own pre-tokenizer drops characters such as newlines from the tiny vocabulary. Other folders
    (the published checkpoints) load through ``AutoTokenizer``.
    """
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = folder / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in GENERIC_TOKENIZER_CLASSES and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
