"""Prompt data: the built-in offline task, local files through `datasets`, and a resumable stream.

Rows are plain dicts: a `prompt` string plus every other column, which reward functions receive
as keyword arguments (TRL's convention), e.g. `answer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUILTIN_ARITHMETIC = "builtin:arithmetic"


def arithmetic_rows(n: int, seed: int = 0, max_operand: int = 4) -> list[dict]:
    """The quickstart task: "a+b=" with single-digit a, b; the answer is the sum's digits.

    With operands up to 4 the answer is one of 9 digits, so a model that answers with a random
    digit is right about 1 time in 9: early successes happen by chance and GRPO has signal.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, max_operand + 1, size=n)
    b = rng.integers(0, max_operand + 1, size=n)
    return [{"prompt": f"{x}+{y}=", "answer": str(x + y)} for x, y in zip(a.tolist(), b.tolist())]


def load_rows(
    source: str,
    *,
    prompt_column: str = "prompt",
    num_rows: int = 512,
    seed: int = 0,
    split: str = "train",
) -> list[dict]:
    """Rows from `source`: `builtin:arithmetic`, or a local JSONL/JSON/CSV/Parquet file or a
    `save_to_disk` directory, read with `datasets`. The `prompt_column` is renamed to `prompt`.
    """
    if source == BUILTIN_ARITHMETIC:
        rows = arithmetic_rows(num_rows, seed=seed)
    else:
        rows = _load_with_datasets(source, split)
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
    return rows


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
