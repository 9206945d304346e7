"""Thinking-mode completions (Qwen3's `<think>...</think>`).

Prompts go through the chat template in stages.data.encode_prompt. Here, `split_thinking`
separates the reasoning block from the answer after it; the reward stage passes both to every
reward function as `completion_thinking` and `completion_answer`.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of one completion.

    "<think>\\nplan\\n</think>\\n\\n42" -> ("plan", "42"). The opening tag may be missing (the
    chat template can put it in the prompt). Without "</think>": an unfinished thinking block
    (text starts with "<think>") gives (its text, ""); no block at all gives (None, text).
    Both parts are stripped of surrounding whitespace.
    """
    head, closed, tail = text.partition(THINK_CLOSE)
    if closed:
        thinking = head.strip()
        if thinking.startswith(THINK_OPEN):
            thinking = thinking[len(THINK_OPEN) :].strip()
        return thinking, tail.strip()
    stripped = text.strip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN) :].strip(), ""
    return None, stripped


def completion_parts(texts: list[str]) -> dict[str, list]:
    """Reward keyword arguments: `completion_thinking` (str or None) and `completion_answer`."""
    parts = [split_thinking(t) for t in texts]
    return {
        "completion_thinking": [thinking for thinking, _ in parts],
        "completion_answer": [answer for _, answer in parts],
    }
