"""Prompt datasets for RL: reading JSONL and Parquet files, picking the prompt, label and metadata out of
each row (dotted keys reach nested fields), wrapping the problem text in a prompt template, rendering the
tokenizer's chat template, tokenising, and an epoch-aware sampler whose position can be saved and
restored exactly.

Not responsible for the built-in generated tasks (``rl.tasks``), for loading the tokenizer (the caller
passes the checkpoint's), for copying a prompt into its n samples and group indices (``rl.loop``), nor
for grading answers (``rl.rewards``).

Formats (spec rl-recipe.md section 1.7):

- JSONL, one object per line; blank lines are skipped. Parquet, read with pyarrow; nested columns (the
  verl layout: ``prompt`` a list of ``{role, content}``, ``reward_model.ground_truth`` the answer) are
  reached with dotted keys.
- A prompt is a string or a list of chat messages. With ``apply_chat_template`` a string is wrapped into
  one user message and the tokenizer's chat template is rendered (``tokenize=False``,
  ``add_generation_prompt=True``); without it a string is used as is, and a message list is an error.
- A prompt template wraps the problem text (a string prompt, or the content of the last user message)
  before the chat template. ``dapo`` is the instruction of the zhuzilin/dapo-math-17k JSONL, so the bare
  verl parquet of DAPO-Math-17k and the wrapped JSONL give identical prompts.
- Prompts are tokenised with ``add_special_tokens=False``. A prompt longer than ``max_prompt_len``
  tokens is an error that names the row (prompts are never dropped silently).
"""

import dataclasses
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from league.checks import check_int, check_seed
from league.records import read_records

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: \\boxed{{$Answer}} where $Answer is the answer to the problem.\n\n{prompt}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
PROMPT_TEMPLATES = {"dapo": DAPO_TEMPLATE}
"""Named prompt templates: format strings with one ``{prompt}`` field (literal braces doubled)."""

EXTENSIONS = (".jsonl", ".parquet")
_MISSING = object()
_TOKENIZE_CHUNK = 1024


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training prompts come from and how they become token ids."""

    prompt_data: str
    """Prompt dataset: a .jsonl file (one object per line) or a .parquet file."""
    input_key: str = "prompt"
    """Key of the prompt in each row (a string or a list of chat messages); dots reach nested fields."""
    label_key: str | None = "label"
    """Key of the ground-truth answer (e.g. reward_model.ground_truth); None: rows have no label."""
    metadata_key: str | None = None
    """Key of a per-row metadata object handed to the reward; None: no metadata."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (a string prompt becomes one user message)."""
    prompt_template: str | None = None
    """Wrap the problem text before the chat template: a named template (dapo) or a format string with {prompt}."""
    rollout_shuffle: bool = False
    """Shuffle the prompts, with a new permutation each epoch."""
    rollout_seed: int = 42
    """Seed of the shuffle: epoch e uses random.Random(rollout_seed + e)."""
    max_prompt_len: int | None = None
    """Longest prompt in tokens; a longer one is an error naming its row. None: no limit."""

    def __post_init__(self) -> None:
        if not self.prompt_data:
            raise ValueError("`--prompt-data` is empty; expected a .jsonl or .parquet file")
        if not self.input_key:
            raise ValueError("`--input-key` is empty; expected the key of the prompt in each row")
        for name in ("label_key", "metadata_key"):
            if getattr(self, name) == "":
                raise ValueError(f"`--{name.replace('_', '-')}` is empty; pass a key or leave it unset (None)")
        if self.prompt_template is not None:
            resolve_template(self.prompt_template)
        if self.max_prompt_len is not None:
            check_int("--max-prompt-len", self.max_prompt_len, 1)
        check_seed("--rollout-seed", self.rollout_seed)


@dataclass(kw_only=True, slots=True)
class PromptRecord:
    """One prompt, rendered and tokenised."""

    index: int
    """Position in the dataset (0-based, in file order)."""
    prompt_text: str
    """The text that was tokenised (after the prompt template and the chat template)."""
    prompt_ids: list[int]
    label: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_template(template: str) -> str:
    """The format string of a prompt template: a name in ``PROMPT_TEMPLATES``, or a format string whose
    only field is ``{prompt}`` (literal braces written ``{{`` and ``}}``)."""
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    expected = f"a named template ({', '.join(PROMPT_TEMPLATES)}) or a format string with {{prompt}}"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"`--prompt-template` {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
    if not fields:
        raise ValueError(f"`--prompt-template` {template!r}: expected {expected}")
    for name, spec, conv in fields:
        if name != "prompt" or spec or conv:
            raise ValueError(
                f"`--prompt-template` {template!r}: the only field allowed is {{prompt}}, found "
                f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                "(write literal braces as {{ and }})"
            )
    return template


def check_data_file(path: str | Path) -> Path:
    """``path`` as a Path, once it is known to be an existing .jsonl or .parquet file."""
    path = Path(path)
    if path.suffix not in EXTENSIONS:
        raise ValueError(f"prompt data {path}: unknown extension {path.suffix!r}; expected one of {EXTENSIONS}")
    if not path.exists():
        raise ValueError(f"prompt data {path}: no such file")
    if not path.is_file():
        raise ValueError(f"prompt data {path}: not a file; expected a {path.suffix} file")
    return path


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a prompt file (``.jsonl`` or ``.parquet``), each with where it is (``records.read_records``)."""
    return read_records(check_data_file(path), "prompt data")


def _lookup(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, or for a dotted key the nested field (``reward_model.ground_truth``); a key present
    as it is wins over its dotted reading. ``_MISSING`` when absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _prompt(where: str, value: Any, key: str) -> str | list[dict[str, str]]:
    expected = "a string or a list of {role, content} chat messages"
    if value is _MISSING:
        raise ValueError(f"{where}: no prompt at key {key!r} (`--input-key`); expected {expected}")
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where}: the prompt at key {key!r} is an empty string")
        return value
    if not isinstance(value, list):
        raise ValueError(f"{where}: the prompt at key {key!r} is of type {type(value).__name__}; expected {expected}")
    if not value:
        raise ValueError(f"{where}: the prompt at key {key!r} is an empty message list")
    messages = []
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"{where}: message {i} of the prompt at key {key!r} is {message!r}; "
                "expected an object with string `role` and `content`"
            )
        messages.append(dict(message))
    return messages


def _label(where: str, value: Any, key: str) -> str:
    if value is _MISSING:
        raise ValueError(f"{where}: no label at key {key!r} (`--label-key`); expected a string")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{where}: the label at key {key!r} is {value!r}; expected a string")
    return str(value)


def _metadata(where: str, value: Any, key: str) -> dict[str, Any]:
    if value is _MISSING or value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: the metadata at key {key!r} is of type {type(value).__name__}; expected an object")
    return value


def _apply_template(prompt: str | list[dict[str, str]], template: str, where: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        return template.format(prompt=prompt)
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: `--prompt-template` needs a user message in the prompt, found none")
    prompt = [dict(m) for m in prompt]
    prompt[users[-1]]["content"] = template.format(prompt=prompt[users[-1]]["content"])
    return prompt


def render_prompt(prompt: str | list[dict[str, str]], tokenizer: Any, apply_chat_template: bool) -> str:
    """The text of a prompt: the chat template rendered for generation, or the string as it is.

    Args:
        prompt: a string, or a list of ``{role, content}`` messages (which needs ``apply_chat_template``).
        tokenizer: a Hugging Face tokenizer with a ``chat_template`` (used only with ``apply_chat_template``).
        apply_chat_template: render ``tokenizer.apply_chat_template(..., tokenize=False,
            add_generation_prompt=True)``; a string is wrapped into one user message first.
    """
    if not apply_chat_template:
        if not isinstance(prompt, str):
            raise ValueError(
                "the prompt is a list of chat messages; pass --apply-chat-template to render it with the "
                "tokenizer's chat template"
            )
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptDataset:
    """All prompts of one file, rendered and tokenised at load time, in file order.

    Args:
        config: the data config (file, keys, templates, length limit).
        tokenizer: the checkpoint's Hugging Face tokenizer (called with ``add_special_tokens=False``).
    """

    def __init__(self, config: DataConfig, tokenizer: Any) -> None:
        self.config = config
        self.path = Path(config.prompt_data)
        if config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"`--apply-chat-template` is set but the tokenizer has no chat template (loading {self.path})"
            )
        template = resolve_template(config.prompt_template) if config.prompt_template is not None else None
        wheres, texts, labels, metadata = [], [], [], []
        metadata_seen = False
        for where, row in read_rows(self.path):
            prompt = _prompt(where, _lookup(row, config.input_key), config.input_key)
            if template is not None:
                prompt = _apply_template(prompt, template, where)
            try:
                texts.append(render_prompt(prompt, tokenizer, config.apply_chat_template))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            labels.append(
                None if config.label_key is None else _label(where, _lookup(row, config.label_key), config.label_key)
            )
            if config.metadata_key is not None:
                value = _lookup(row, config.metadata_key)
                metadata_seen |= value is not _MISSING
                metadata.append(_metadata(where, value, config.metadata_key))
            else:
                metadata.append({})
            wheres.append(where)
        if not texts:
            raise ValueError(f"prompt data {self.path}: no rows; expected at least one prompt")
        if config.metadata_key is not None and not metadata_seen:
            raise ValueError(f"prompt data {self.path}: no row has the metadata key {config.metadata_key!r}")
        ids = []
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            ids.extend(tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"])
        for where, prompt_ids in zip(wheres, ids):
            if not prompt_ids:
                raise ValueError(f"{where}: the prompt tokenises to no tokens")
        if config.max_prompt_len is not None:
            too_long = [(w, len(p)) for w, p in zip(wheres, ids) if len(p) > config.max_prompt_len]
            if too_long:
                where, length = too_long[0]
                more = f" ({len(too_long) - 1} more rows are too long)" if len(too_long) > 1 else ""
                raise ValueError(
                    f"{where}: the prompt has {length} tokens, more than `--max-prompt-len` "
                    f"{config.max_prompt_len}{more}; raise the limit or remove these rows"
                )
        self.records = [
            PromptRecord(index=i, prompt_text=t, prompt_ids=list(p), label=lab, metadata=m)
            for i, (t, p, lab, m) in enumerate(zip(texts, ids, labels, metadata))
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)


class PromptSampler:
    """Indices of the prompts of each rollout step, epoch after epoch.

    Without shuffling every epoch is ``0 .. dataset_len - 1``; with it, epoch ``e`` is the permutation
    ``random.Random(seed + e).shuffle`` makes of that list (the reference system's order). A batch that
    reaches the end of an epoch continues into the next. ``state_dict`` / ``load_state_dict`` save and
    restore the position (epoch, offset within it) exactly.

    Args:
        dataset_len: number of prompts.
        batch_size: prompts per ``next_batch``.
        shuffle: reshuffle every epoch.
        seed: base seed of the shuffle.
    """

    def __init__(self, dataset_len: int, batch_size: int, shuffle: bool = False, seed: int = 42) -> None:
        if dataset_len < 1:
            raise ValueError(f"PromptSampler needs at least one prompt, got dataset_len={dataset_len}")
        if batch_size < 1:
            raise ValueError(f"PromptSampler batch_size must be >= 1, got {batch_size}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        """The prompt indices of ``epoch``, in the order they are drawn."""
        if epoch != self._order_epoch:
            order = list(range(self.dataset_len))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` prompt indices."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.dataset_len - self.position)
            batch.extend(self.order(self.epoch)[self.position : self.position + take])
            self.position += take
            if self.position == self.dataset_len:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "dataset_len": self.dataset_len,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. The dataset size, shuffle and seed must be the ones it was saved
        with (otherwise the order would differ); the batch size may change."""
        for name in ("dataset_len", "shuffle", "seed"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the prompt sampler: it was saved with {name}={state[name]!r}, "
                    f"this run has {name}={getattr(self, name)!r}"
                )
        if not 0 <= state["position"] < self.dataset_len or state["epoch"] < 0:
            raise ValueError(f"cannot resume the prompt sampler: invalid position {state}")
        self.epoch, self.position = state["epoch"], state["position"]


def load_eval_sets(
    specs: list[tuple[str, str]], config: DataConfig, tokenizer: Any, **overrides: Any
) -> dict[str, PromptDataset]:
    """Evaluation datasets by name, rendered like the training prompts.

    Args:
        specs: ``(name, path)`` pairs; names must be distinct.
        config: the training data config; each set uses it with ``prompt_data=path`` and no shuffling.
        tokenizer: the checkpoint's tokenizer.
        overrides: other ``DataConfig`` fields for the evaluation sets, e.g. ``input_key="problem",
            label_key="answer"`` for the AIME files.
    """
    sets: dict[str, PromptDataset] = {}
    for name, path in specs:
        if not name:
            raise ValueError(f"evaluation set {path}: empty name")
        if name in sets:
            raise ValueError(f"evaluation set name {name!r} given twice")
        eval_config = dataclasses.replace(config, **{**overrides, "prompt_data": path, "rollout_shuffle": False})
        sets[name] = PromptDataset(eval_config, tokenizer)
    return sets
