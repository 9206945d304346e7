"""Prompt data: the built-in offline task, local files through `datasets`, and a resumable stream.

Rows are plain dicts: a `prompt` string plus every other column, which reward functions receive
as keyword arguments (TRL's convention), e.g. `answer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.settings import MISSING, check, setting

import numpy as np

BUILTIN_ARITHMETIC = "builtin:arithmetic"
BUILTIN_TOOL_ARITHMETIC = "builtin:tool_arithmetic"  # the tools quickstart's task
BUILTIN_NONE = "builtin:none"  # no dataset: an environment's reset() makes each prompt


@dataclass
class DataConfig:
    """`data.*`: where the prompts come from and how they are encoded."""

    source: str = setting(
        MISSING,
        "builtin:arithmetic | builtin:tool_arithmetic | builtin:none (an environment makes the "
        "prompts), or a .jsonl/.json/.csv/.parquet file or save_to_disk folder",
    )
    prompt_column: str = setting("prompt", "the column holding the prompt (text or chat)")
    num_rows: int = setting(512, "rows generated for the built-in task (ignored for files)")
    use_chat_template: bool = setting(
        False, "wrap a text prompt as a user message in the tokenizer's chat template"
    )
    system_prompt: str | None = setting(None, "system message added before the prompt; null: none")
    columns: dict[str, str] = setting(
        factory=dict, help="reward argument -> dataset column, e.g. {answer: solution}"
    )
    eval_size: int = setting(0, "rows held out of the training data for evaluation (seeded)")
    eval_source: str | None = setting(None, "or a separate file of evaluation prompts")
    chat_template_kwargs: dict[str, Any] = setting(
        factory=dict,
        help="extra chat-template variables, e.g. {enable_thinking: false} for Qwen3",
    )

    def validate(self) -> None:
        check(self.num_rows >= 1, "num_rows", self.num_rows, ">= 1")
        check(self.eval_size >= 0, "eval_size", self.eval_size, ">= 0")
        check(
            not self.chat_template_kwargs or self.use_chat_template,
            "chat_template_kwargs",
            dict(self.chat_template_kwargs),
            "empty unless data.use_chat_template=true",
        )


def arithmetic_rows(n: int, seed: int = 0, max_operand: int = 4) -> list[dict]:
    """The quickstart task: "a+b=" with single-digit a, b; the answer is the sum's digits.

    With operands up to 4 the answer is one of 9 digits, so a model that answers with a random
    digit is right about 1 time in 9: early successes happen by chance and GRPO has signal.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, max_operand + 1, size=n)
    b = rng.integers(0, max_operand + 1, size=n)
    return [{"prompt": f"{x}+{y}=", "answer": str(x + y)} for x, y in zip(a.tolist(), b.tolist())]


def tool_arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """The tools quickstart's task: "a+b=" with three-digit a, b in 500..999 (so every sum has
    four digits); the answer is the sum.

    The built-in tiny model cannot add three-digit numbers from its weights (a 2-layer model
    with 64 dimensions, trained on no sums); with the `add` tool it only has to copy the
    operands into the call and the tool's result into its answer.
    """
    rng = np.random.default_rng([seed, 3])
    a = rng.integers(500, 1000, size=n)
    b = rng.integers(500, 1000, size=n)
    return [{"prompt": f"{x}+{y}=", "answer": str(x + y)} for x, y in zip(a.tolist(), b.tolist())]


def placeholder_rows(n: int) -> list[dict]:
    """TRL's rows when an environment owns the data: an empty user message each, plus the
    row's `seed` (its index) so an environment can draw its episode reproducibly."""
    return [{"prompt": [{"role": "user", "content": ""}], "seed": i} for i in range(n)]


def load_rows(
    source: str,
    *,
    prompt_column: str = "prompt",
    num_rows: int = 512,
    seed: int = 0,
    split: str = "train",
    columns: dict[str, str] | None = None,
) -> list[dict]:
    """Rows from `source`: `builtin:arithmetic`, `builtin:tool_arithmetic`, `builtin:none`
    (placeholder rows for an environment), or a local JSONL/JSON/CSV/Parquet file or a
    `save_to_disk` directory, read with `datasets`. The `prompt_column` is renamed to `prompt`;
    `columns` maps reward argument names to dataset columns ({"answer": "solution"} gives each
    row an `answer` holding its `solution`). A prompt is a string or a chat (a list of
    {"role", "content"} messages, e.g. a `messages` column).
    """
    if source == BUILTIN_ARITHMETIC:
        rows = arithmetic_rows(num_rows, seed=seed)
    elif source == BUILTIN_TOOL_ARITHMETIC:
        rows = tool_arithmetic_rows(num_rows, seed=seed)
    elif source == BUILTIN_NONE:
        rows = placeholder_rows(num_rows)
    else:
        rows = _load_with_datasets(source, split)
        for name, column in (columns or {}).items():
            if rows and column not in rows[0]:
                raise ValueError(
                    f"dataset {source} has no column {column!r} (data.columns.{name}); its "
                    f"columns are {sorted(rows[0])}"
                )
            rows = [{**row, name: row[column]} for row in rows]
        if rows and prompt_column not in rows[0]:
            raise ValueError(
                f"dataset {source} has no prompt column {prompt_column!r}; its columns are "
                f"{sorted(rows[0])}; set data.prompt_column to one of them"
            )
        if prompt_column != "prompt":
            rows = [
                {
                    "prompt": row[prompt_column],
                    **{k: v for k, v in row.items() if k != prompt_column},
                }
                for row in rows
            ]
    if not rows:
        raise ValueError(f"dataset {source} has no rows")
    for index, row in enumerate(rows):
        if not _is_prompt(row["prompt"]):
            raise ValueError(
                f"dataset {source} row {index}: prompt must be a string or a list of "
                f"{{'role', 'content'}} messages, got {str(row['prompt'])[:80]!r}"
            )
    return rows


def _is_prompt(value) -> bool:
    if isinstance(value, str):
        return bool(value)
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
    )


def split_rows(rows: list[dict], eval_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): `eval_size` rows held out, chosen by a seeded permutation, so the
    split is the same on every run and resume with this seed. Order within each part is kept."""
    if eval_size < 0:
        raise ValueError(f"eval size must be >= 0, got {eval_size}")
    if eval_size >= len(rows):
        raise ValueError(
            f"eval split of {eval_size} rows is not smaller than the dataset ({len(rows)} rows); "
            "lower data.eval_size"
        )
    if eval_size == 0:
        return rows, []
    held_out = set(np.random.default_rng([seed, 1]).permutation(len(rows))[:eval_size].tolist())
    train = [row for i, row in enumerate(rows) if i not in held_out]
    return train, [row for i, row in enumerate(rows) if i in held_out]


def check_columns(rows: list[dict], needed: dict[str, list[str]], source: str) -> None:
    """Every column a reward needs is in the rows. needed: reward name -> column names."""
    present = set(rows[0]) if rows else set()
    for reward, names in needed.items():
        for name in names:
            if name not in present:
                raise ValueError(
                    f"reward {reward} needs column {name!r} but dataset {source} has "
                    f"{sorted(present)}; map one with data.columns.{name}=<column>"
                )


def prompt_messages(prompt, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for a prompt: a string becomes one user message; a chat is used as is
    except that trailing assistant turns (an SFT-style reference answer) are dropped. The
    system prompt is added first unless the chat has one."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise ValueError("a chat prompt holds only assistant messages")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def encode_prompt(
    tokenizer,
    prompt,
    *,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    template_kwargs: Mapping | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of a prompt. Chats always go through the tokenizer's chat template (with the
    generation prompt); plain strings only when `use_chat_template`. `template_kwargs` are extra
    template variables, e.g. {"enable_thinking": False} for Qwen3's non-thinking mode; `tools`
    the tools' JSON schemas for the template's `tools=` argument."""
    if isinstance(prompt, str) and not use_chat_template:
        return tokenizer.encode(prompt)
    if not getattr(tokenizer, "chat_template", None):
        what = "data.use_chat_template=true" if isinstance(prompt, str) else "a chat prompt"
        raise ValueError(f"{what} needs a chat template but the tokenizer has none")
    kwargs = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    ids = tokenizer.apply_chat_template(
        prompt_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=True, **kwargs
    )
    # transformers 5 may return a BatchEncoding-like mapping for tokenize=True.
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return list(ids)


def _load_with_datasets(source: str, split: str) -> list[dict]:
    import datasets

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    datasets.disable_progress_bars()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
    else:
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
            path.suffix
        )
        if builder is None:
            raise ValueError(
                f"dataset {path}: unsupported file type {path.suffix!r} "
                "(use .jsonl, .json, .csv, .parquet or a save_to_disk directory)"
            )
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    return loaded.to_list()


@dataclass
class PromptStream:
    """Seeded, epoch-shuffled iteration over rows whose position can be saved and restored.

    `position` counts rows consumed since the start of training, so a resumed run sees exactly
    the prompts an uninterrupted run would have seen next.
    """

    rows: list[dict]
    seed: int = 0
    position: int = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_batch(self, n: int) -> list[dict]:
        batch, orders = [], {}
        for _ in range(n):
            epoch, index = divmod(self.position, len(self.rows))
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            batch.append(self.rows[int(orders[epoch][index])])
            self.position += 1
        return batch


def load_splits(cfg: DataConfig, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) per `cfg`: `cfg.eval_size` rows held out of `cfg.source`
    (seeded), plus every row of `cfg.eval_source` when given (same prompt column and column
    mapping)."""
    options = {"prompt_column": cfg.prompt_column, "columns": dict(cfg.columns)}
    rows = load_rows(cfg.source, num_rows=cfg.num_rows, seed=seed, **options)
    train, held_out = split_rows(rows, cfg.eval_size, seed)
    if cfg.eval_source:
        held_out = held_out + load_rows(
            cfg.eval_source, num_rows=cfg.num_rows, seed=seed + 1, **options
        )
    return train, held_out


def encode_prompts(tokenizer, prompts: list, cfg: DataConfig) -> list[list[int]]:
    """Token ids of each prompt (text or chat) per `cfg` (chat template, system prompt)."""
    return [
        encode_prompt(
            tokenizer,
            prompt,
            use_chat_template=cfg.use_chat_template,
            system_prompt=cfg.system_prompt,
            template_kwargs=cfg.chat_template_kwargs,
        )
        for prompt in prompts
    ]
