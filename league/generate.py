"""``league generate``: prompts from the command line or a JSONL file, through the engine, on a checkpoint.

Not responsible for the engine (``league.engine``) nor for loading weights (``league.checkpoint``).
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from league.checks import SEED_MAX, check_seed
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import GenerateOutput, SamplingParams
from league.records import read_records, token_ids


@dataclass(kw_only=True, slots=True)
class GenerateReport:
    outputs: list[GenerateOutput]
    seconds: float
    accept_length: float
    """Mean tokens per verify step under speculation (0 without)."""

    @property
    def generated_tokens(self) -> int:
        return sum(len(o.output_ids) for o in self.outputs)


def read_prompt_file(path: Path, tokenizer, vocab_size: int) -> list[list[int]]:
    """One prompt per row of a JSON Lines (or Parquet) file: ``{"input_ids": [...]}``, ``{"text": "..."}`` or
    ``{"prompt": "..."}``."""
    prompts = []
    for where, row in read_records(path, "--input-file"):
        if "input_ids" in row:
            prompts.append(token_ids(row["input_ids"], vocab_size, where))
        elif isinstance(row.get("text", row.get("prompt")), str):
            prompts.append(encode(tokenizer, row.get("text", row.get("prompt")), where))
        else:
            raise ValueError(f'{where}: expected "input_ids" (a list of ints) or "text" (a string)')
    if not prompts:
        raise ValueError(f"{path}: the file has no prompts")
    return prompts


def encode(tokenizer, text: str, where: str) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"{where}: a text prompt needs a tokenizer, and the checkpoint has none (pass input_ids)")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def parse_ids(value: str) -> list[int]:
    try:
        return [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--input-ids {value!r}: expected comma-separated integers such as 1,2,3") from None


def generate(
    model_dir: Path,
    prompt: str | None,
    input_ids: str | None,
    input_file: Path | None,
    params: SamplingParams,
    n: int,
    engine_config: EngineConfig,
    device: str | None = None,
    dtype: str | None = None,
    chat: bool = False,
    world: int = 1,
) -> tuple[GenerateReport, Any]:
    """Load ``model_dir``, generate for the given prompts, and return the outputs with timing and acceptance.
    ``world`` > 1: this is one of that many processes (torchrun), which run one engine laid out over them
    (``parallel.inference``) and all make the same calls."""
    import dataclasses

    from league.checkpoint.hf import resolve_device_dtype
    from league.parallel.inference import laid_out_model
    from league.tokenizer import load_tokenizer

    given = [x is not None for x in (prompt, input_ids, input_file)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --prompt, --input-ids, --input-file")
    if params.seed is not None:
        check_seed("--seed", params.seed)
        if params.seed + n - 1 > SEED_MAX:
            raise ValueError(f"`--seed` {params.seed} + `--n` {n} - 1 exceeds 2**63 - 1 (sample i uses seed + i)")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    tp, ep = engine_config.tp_size, engine_config.ep_size
    model, layout, (tp, ep) = laid_out_model(model_dir, torch_device, torch_dtype, tp, ep, world)
    engine_config = dataclasses.replace(engine_config, tp_size=tp, ep_size=ep)
    tokenizer = load_tokenizer(model_dir)
    vocab = model.args.vocab_size
    if prompt is not None:
        text = prompt
        if chat:
            if tokenizer is None or not tokenizer.chat_template:
                raise ValueError("--chat needs a tokenizer with a chat template in the checkpoint folder")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        prompts = [encode(tokenizer, text, "--prompt")]
    elif input_ids is not None:
        prompts = [token_ids(parse_ids(input_ids), vocab, "--input-ids")]
    else:
        prompts = read_prompt_file(Path(input_file), tokenizer, vocab)
    engine = LLMEngine(model, engine_config, tokenizer, layout)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, n=n)
    report = GenerateReport(
        outputs=outputs, seconds=time.perf_counter() - start, accept_length=engine.stats.spec.accept_length
    )
    return report, tokenizer
