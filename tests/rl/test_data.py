"""Prompt datasets: JSONL and Parquet give the same records, dotted keys, string and message prompts,
the chat template, the dapo template, errors that name the file and line, and the epoch-aware sampler
(deterministic shuffles, exact resume). The last tests use the real files in ../shared/data."""

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from league.rl.data import (
    DAPO_TEMPLATE,
    DataConfig,
    PromptDataset,
    PromptRecord,
    PromptSampler,
    load_eval_sets,
    read_rows,
    render_prompt,
    resolve_template,
)

SHARED = Path(__file__).parents[2].parent / "shared"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "what is the sum of two and three one four five find x y if then solve following math problem step by "
    "last line your response should be form answer where answer to remember put on its own after you are "
    'a helpful assistant . , : ? $ + = { } \\ " boxed Answer Solve The Remember Answer What Find You'
).split()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[UNK]", "<|im_start|>", "<|im_end|>", *WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """One JSON object a line; ``raw_lines`` puts verbatim text at given 0-based line positions."""
    lines = [json.dumps(r) for r in rows]
    for i, text in sorted((raw_lines or {}).items()):
        lines.insert(i, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def verl_rows() -> list[dict]:
    """The verl layout of DAPO-Math-17k: prompt messages, nested ground truth, extra_info."""
    problems = [
        ("What is the sum of two and three ?", "5"),
        ("Find x if x + 1 = 4 .", "3"),
        ("What is one + one ?", "2"),
    ]
    return [
        {
            "data_source": "DAPO-17k",
            "prompt": [{"content": p, "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": a, "style": "rule"},
            "extra_info": {"answer": "", "index": i, "split": "train"},
        }
        for i, (p, a) in enumerate(problems)
    ]


def config(path: Path, **kw) -> DataConfig:
    return DataConfig(prompt_data=str(path), **kw)


# config ------------------------------------------------------------------------------------------------


def test_config_validation():
    DataConfig(prompt_data="builtin:add")  # existence is checked when loading, not here
    assert resolve_template("dapo") == DAPO_TEMPLATE
    assert resolve_template("Q: {prompt} {{x}}").format(prompt="p") == "Q: p {x}"
    for kw, match in [
        (dict(prompt_data=""), "prompt-data"),
        (dict(input_key=""), "input-key"),
        (dict(label_key=""), "label-key"),
        (dict(max_prompt_len=0), "max-prompt-len"),
        (dict(prompt_template="nope"), "named template"),
        (dict(prompt_template="{question}"), r"\{question\}"),
        (dict(prompt_template="{prompt!r}"), "only field"),
        (dict(prompt_template="\\boxed{ {prompt}"), "literal braces"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataConfig(**{"prompt_data": "x.jsonl", **kw})


# loading -----------------------------------------------------------------------------------------------


def test_jsonl_and_parquet_give_the_same_records(tmp_path, tokenizer):
    rows = verl_rows()
    kw = dict(label_key="reward_model.ground_truth", metadata_key="extra_info", apply_chat_template=True)
    from_jsonl = PromptDataset(config(write_jsonl(tmp_path / "d.jsonl", rows), **kw), tokenizer)
    from_parquet = PromptDataset(config(write_parquet(tmp_path / "d.parquet", rows), **kw), tokenizer)
    assert len(from_jsonl) == len(from_parquet) == 3
    assert list(from_jsonl) == list(from_parquet)
    first = from_parquet[0]
    assert isinstance(first, PromptRecord)
    assert first.index == 0 and first.label == "5"
    assert first.metadata == {"answer": "", "index": 0, "split": "train"}
    assert (
        first.prompt_text == "<|im_start|>user\nWhat is the sum of two and three ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first.prompt_ids == tokenizer(first.prompt_text, add_special_tokens=False)["input_ids"]
    assert [r.index for r in from_parquet] == [0, 1, 2]


def test_dotted_keys(tmp_path, tokenizer):
    rows = [
        {"q": {"text": "one + one ?"}, "reward_model": {"ground_truth": 2}, "a.b": "literal"},
        {"q": {"text": "two + two ?"}, "reward_model": {"ground_truth": "4"}, "a.b": "literal"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(config(path, input_key="q.text", label_key="reward_model.ground_truth"), tokenizer)
    assert [r.prompt_text for r in ds] == ["one + one ?", "two + two ?"]
    assert [r.label for r in ds] == ["2", "4"]  # integer labels become strings
    ds = PromptDataset(config(path, input_key="q.text", label_key="a.b"), tokenizer)
    assert ds[1].label == "literal"  # a key present as it is wins over the dotted reading
    with pytest.raises(ValueError, match=rf"{path} line 1: no label at key 'reward_model.answer'"):
        PromptDataset(config(path, input_key="q.text", label_key="reward_model.answer"), tokenizer)


def test_string_and_message_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "What is one + one ?", "label": "2"}])
    plain = PromptDataset(config(path), tokenizer)[0]
    assert plain.prompt_text == "What is one + one ?"
    assert plain.prompt_ids == tokenizer("What is one + one ?", add_special_tokens=False)["input_ids"]
    assert plain.label == "2" and plain.metadata == {}
    chat = PromptDataset(config(path, apply_chat_template=True), tokenizer)[0]
    assert chat.prompt_text == "<|im_start|>user\nWhat is one + one ?<|im_end|>\n<|im_start|>assistant\n"

    messages = [{"role": "system", "content": "You are a helpful assistant ."}, {"role": "user", "content": "Solve"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": messages, "label": "1"}] * 2)
    record = PromptDataset(config(path, apply_chat_template=True), tokenizer)[1]
    assert record.prompt_text == (
        "<|im_start|>system\nYou are a helpful assistant .<|im_end|>\n<|im_start|>user\nSolve<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert record.index == 1
    with pytest.raises(ValueError, match=rf"{path} line 1: .*pass --apply-chat-template"):
        PromptDataset(config(path), tokenizer)
    with pytest.raises(ValueError, match="pass --apply-chat-template"):
        render_prompt(messages, tokenizer, apply_chat_template=False)


def test_no_label_key_and_metadata(tmp_path, tokenizer):
    rows = [{"prompt": "one ?", "meta": {"k": 1}}, {"prompt": "two ?"}, {"prompt": "three ?", "meta": None}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(config(path, label_key=None, metadata_key="meta"), tokenizer)
    assert [r.label for r in ds] == [None, None, None]
    assert [r.metadata for r in ds] == [{"k": 1}, {}, {}]
    with pytest.raises(ValueError, match="no row has the metadata key 'metdata'"):
        PromptDataset(config(path, label_key=None, metadata_key="metdata"), tokenizer)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "one ?", "meta": [1]}])
    with pytest.raises(ValueError, match=rf"{path} line 1: the metadata at key 'meta' is of type list"):
        PromptDataset(config(path, label_key=None, metadata_key="meta"), tokenizer)


def test_chat_template_required(tmp_path, tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "one ?", "label": "1"}])
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        PromptDataset(config(path, apply_chat_template=True), bare)


def test_dapo_template_matches_the_wrapped_jsonl(tmp_path, tokenizer):
    rows = verl_rows()
    wrapped = [
        {
            "prompt": [{"content": DAPO_TEMPLATE.format(prompt=r["prompt"][0]["content"]), "role": "user"}],
            "label": r["reward_model"]["ground_truth"],
        }
        for r in rows
    ]
    bare = PromptDataset(
        config(
            write_parquet(tmp_path / "bare.parquet", rows),
            label_key="reward_model.ground_truth",
            apply_chat_template=True,
            prompt_template="dapo",
        ),
        tokenizer,
    )
    reference = PromptDataset(
        config(write_jsonl(tmp_path / "wrapped.jsonl", wrapped), apply_chat_template=True), tokenizer
    )
    assert list(bare) == list(reference)
    # the exact text of the instruction, literal braces included
    assert DAPO_TEMPLATE.format(prompt="<PROBLEM>") == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: \\boxed{$Answer} where $Answer is the answer to the problem.\n\n<PROBLEM>\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    # a string prompt, without the chat template; the template goes to the last user message
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "one + one ?", "label": "2"}])
    assert (
        PromptDataset(config(path, prompt_template="Q: {prompt} A:"), tokenizer)[0].prompt_text == "Q: one + one ? A:"
    )
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "two"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": messages, "label": "2"}])
    text = PromptDataset(config(path, prompt_template="[{prompt}]", apply_chat_template=True), tokenizer)[0].prompt_text
    assert "user\none<|im_end|>" in text and "user\n[two]<|im_end|>" in text
    path = write_jsonl(tmp_path / "nouser.jsonl", [{"prompt": [{"role": "system", "content": "x"}], "label": "2"}])
    with pytest.raises(ValueError, match="line 1: `--prompt-template` needs a user message"):
        PromptDataset(config(path, prompt_template="dapo", apply_chat_template=True), tokenizer)


GOOD = {"prompt": "one ?", "label": "1"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"prompt": "one ?", "label": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"question": "one ?", "label": "1"}', "no prompt at key 'prompt'"),
        ('{"prompt": "one ?"}', "no label at key 'label'"),
        ('{"prompt": 7, "label": "1"}', "the prompt at key 'prompt' is of type int; expected a string or a list"),
        ('{"prompt": "", "label": "1"}', "the prompt at key 'prompt' is an empty string"),
        ('{"prompt": [], "label": "1"}', "the prompt at key 'prompt' is an empty message list"),
        ('{"prompt": [{"role": "user"}], "label": "1"}', "message 0 .* expected an object with string `role`"),
        ('{"prompt": "one ?", "label": ["1"]}', "the label at key 'label' is \\['1'\\]; expected a string"),
        ('{"prompt": "one ?", "label": null}', "the label at key 'label' is None"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, bad, match):
    # line 1 good, line 2 blank (skipped but counted), line 3 bad
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD], raw_lines={1: "", 2: bad})
    with pytest.raises(ValueError, match=re.escape(f"{path} line 3: ") + match):
        PromptDataset(config(path, apply_chat_template=True), tokenizer)


def test_bad_parquet_row_names_file_and_row(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [GOOD, {"prompt": "two ?", "label": None}])
    with pytest.raises(ValueError, match=rf"{path} row 2: the label at key 'label' is None"):
        PromptDataset(config(path), tokenizer)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        PromptDataset(config(not_parquet), tokenizer)


def test_empty_missing_and_unknown_files(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"{empty}: no rows"):
        PromptDataset(config(empty), tokenizer)
    schema_only = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "label": pa.array([], pa.string())}), schema_only)
    with pytest.raises(ValueError, match="no rows"):
        PromptDataset(config(schema_only), tokenizer)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'missing.jsonl'}: no such file"):
        PromptDataset(config(tmp_path / "missing.jsonl"), tokenizer)
    (tmp_path / "d.csv").write_text("prompt,label\n")
    with pytest.raises(ValueError, match=r"unknown extension '.csv'; expected one of \('.jsonl', '.parquet'\)"):
        PromptDataset(config(tmp_path / "d.csv"), tokenizer)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        PromptDataset(config(tmp_path / "dir.jsonl"), tokenizer)


def test_max_prompt_len(tmp_path, tokenizer):
    rows = [
        {"prompt": "one ?", "label": "1"},
        {"prompt": "what is one + one ?", "label": "2"},
        {"prompt": "what is two + two ?", "label": "4"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(PromptDataset(config(path, max_prompt_len=6), tokenizer)) == 3
    with pytest.raises(
        ValueError,
        match=rf"{path} line 2: the prompt has 6 tokens, more than `--max-prompt-len` 5 "
        r"\(1 more rows are too long\)",
    ):
        PromptDataset(config(path, max_prompt_len=5), tokenizer)


def test_read_rows_locations(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD], raw_lines={0: ""})
    assert [where for where, _ in read_rows(path)] == [f"{path} line 2", f"{path} line 3"]
    path = write_parquet(tmp_path / "d.parquet", [GOOD, GOOD])
    assert list(read_rows(path)) == [(f"{path} row 1", GOOD), (f"{path} row 2", GOOD)]


def test_load_eval_sets(tmp_path, tokenizer):
    aime = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "one + one ?", "answer": "002", "id": 1}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"problem": "two ?", "answer": "2"}] * 2)
    train = DataConfig(prompt_data="train.jsonl", apply_chat_template=True, rollout_shuffle=True)
    sets = load_eval_sets(
        [("aime", str(aime)), ("other", str(other))], train, tokenizer, input_key="problem", label_key="answer"
    )
    assert list(sets) == ["aime", "other"] and [len(s) for s in sets.values()] == [1, 2]
    assert sets["aime"][0].label == "002"
    assert sets["aime"][0].prompt_text.startswith("<|im_start|>user\none + one ?")
    assert not sets["aime"].config.rollout_shuffle
    with pytest.raises(ValueError, match="given twice"):
        load_eval_sets([("a", str(aime)), ("a", str(other))], train, tokenizer, input_key="problem", label_key="answer")


# sampler -----------------------------------------------------------------------------------------------


def draw(sampler: PromptSampler, k: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(k)]


def test_sampler_in_order_crosses_epochs():
    sampler = PromptSampler(5, 3)
    assert draw(sampler, 4) == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["position"] == 2
    assert draw(PromptSampler(2, 5), 2) == [[0, 1, 0, 1, 0], [1, 0, 1, 0, 1]]


def test_sampler_shuffle_is_deterministic_and_changes_each_epoch():
    n = 50
    batches = draw(PromptSampler(n, 10, shuffle=True, seed=7), 15)
    assert batches == draw(PromptSampler(n, 10, shuffle=True, seed=7), 15)
    assert batches != draw(PromptSampler(n, 10, shuffle=True, seed=8), 15)
    epochs = [sum(batches[5 * e : 5 * e + 5], []) for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(n))
        # the reference: random.seed(seed + epoch); random.shuffle(list(range(n)))
        state = random.getstate()
        random.seed(7 + e)
        expected = list(range(n))
        random.shuffle(expected)
        random.setstate(state)
        assert order == expected
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n, batch_size, k", [(10, 3, 4), (10, 5, 2), (7, 16, 3), (13, 4, 0)])
def test_sampler_state_round_trips_exactly(shuffle, n, batch_size, k):
    uninterrupted = PromptSampler(n, batch_size, shuffle=shuffle, seed=3)
    expected = draw(uninterrupted, k + 6)
    first = PromptSampler(n, batch_size, shuffle=shuffle, seed=3)
    assert draw(first, k) == expected[:k]
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = PromptSampler(n, batch_size, shuffle=shuffle, seed=3)
    resumed.load_state_dict(state)
    assert draw(resumed, 6) == expected[k:]


def test_sampler_resume_checks():
    state = PromptSampler(10, 3, shuffle=True, seed=1).state_dict()
    for kw in [dict(dataset_len=11), dict(shuffle=False), dict(seed=2)]:
        args = {"dataset_len": 10, "batch_size": 3, "shuffle": True, "seed": 1, **kw}
        with pytest.raises(ValueError, match="cannot resume the prompt sampler"):
            PromptSampler(**args).load_state_dict(state)
    PromptSampler(10, 4, shuffle=True, seed=1).load_state_dict(state)  # a new batch size is fine
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSampler(0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(3, 0)


# the real files in ../shared/data ---------------------------------------------------------------------

DAPO = SHARED / "data/train/svs_dapo_math_17k.parquet"
QWEN3 = SHARED / "data/tokenizer/qwen3"
# The first row of the zhuzilin/dapo-math-17k JSONL (the instruction already added), as the slime docs show it.
ZHUZILIN_FIRST_ROW = (
    r'{"prompt": [{"content": "Solve the following math problem step by step. The last line of your response '
    r"should be of the form Answer: \\boxed{$Answer} where $Answer is the answer to the problem.\n\nIn triangle "
    r"$ABC$, $\\sin \\angle A = \\frac{4}{5}$ and $\\angle A < 90^\\circ$. Let $D$ be a point outside triangle "
    r"$ABC$ such that $\\angle BAD = \\angle DAC$ and $\\angle BDC = 90^\\circ$. Suppose that $AD = 1$ and that "
    r"$\\frac{BD}{CD} = \\frac{3}{2}$. If $AB + AC$ can be expressed in the form $\\frac{a\\sqrt{b}}{c}$ where "
    r"$a, b, c$ are pairwise relatively prime integers, find $a + b + c$.\n\nRemember to put your answer on its "
    r'own line after \"Answer:\".", "role": "user"}], "label": "34"}'
)


def needs_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared data folder (../shared next to the repository) is not here")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    needs_shared(QWEN3)
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3")
    (folder / "tokenizer.json").write_bytes(gzip.decompress((QWEN3 / "invokeai_qwen3_tokenizer.json.gz").read_bytes()))
    shutil.copy(QWEN3 / "invokeai_qwen3_tokenizer_config.json", folder / "tokenizer_config.json")
    shutil.copy(QWEN3 / "invokeai_qwen3_special_tokens_map.json", folder / "special_tokens_map.json")
    return AutoTokenizer.from_pretrained(folder)


def test_real_dapo_parquet_reads_whole():
    needs_shared(DAPO)
    rows = [row for _, row in read_rows(DAPO)]
    assert len(rows) == 17_917
    assert all(len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user" for r in rows)
    assert all(isinstance(r["reward_model"]["ground_truth"], str) for r in rows)


def test_real_dapo_with_dapo_template_equals_the_wrapped_jsonl(tmp_path, qwen3):
    needs_shared(DAPO)
    head = pq.read_table(DAPO).slice(0, 3)
    bare = PromptDataset(
        config(
            write_parquet(tmp_path / "head.parquet", head.to_pylist()),
            label_key="reward_model.ground_truth",
            metadata_key="extra_info",
            apply_chat_template=True,
            prompt_template="dapo",
        ),
        qwen3,
    )
    wrapped_path = tmp_path / "zhuzilin_first.jsonl"
    wrapped_path.write_text(ZHUZILIN_FIRST_ROW + "\n")
    wrapped = PromptDataset(config(wrapped_path, apply_chat_template=True), qwen3)[0]
    first = bare[0]
    assert (first.prompt_text, first.prompt_ids, first.label) == (wrapped.prompt_text, wrapped.prompt_ids, "34")
    assert first.prompt_text.startswith("<|im_start|>user\nSolve the following math problem step by step.")
    assert first.prompt_text.endswith('after "Answer:".<|im_end|>\n<|im_start|>assistant\n')
    assert first.prompt_ids == qwen3(first.prompt_text, add_special_tokens=False)["input_ids"]
    assert first.metadata == {"answer": "", "index": 0, "split": "train"}
    assert [r.metadata["index"] for r in bare] == [0, 1, 2]


def test_real_eval_sets(qwen3):
    aime24 = SHARED / "data/eval/qwen25math_aime24_test.jsonl"
    aime25 = SHARED / "data/eval/zlmeh_aime25_test.jsonl"
    needs_shared(aime24)
    train = DataConfig(prompt_data=str(DAPO), apply_chat_template=True, prompt_template="dapo")
    sets = load_eval_sets(
        [("aime24", str(aime24)), ("aime25", str(aime25))], train, qwen3, input_key="problem", label_key="answer"
    )
    assert [len(s) for s in sets.values()] == [30, 30]
    assert sets["aime24"][0].label == "204" and sets["aime25"][0].label == "70"
    assert "Find the sum of all integer bases $b>9$" in sets["aime25"][0].prompt_text
    assert sets["aime25"][0].prompt_text.startswith("<|im_start|>user\nSolve the following math problem")
