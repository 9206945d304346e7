"""Chat-template prompts and thinking-mode completions (Qwen3's `<think>...</think>`).

Prompts: `encode_chat` renders a user message (plus an optional system prompt) with the
tokenizer's own chat template, passing extra template variables through, e.g.
`{"enable_thinking": False}` for Qwen3's non-thinking mode.

Completions: `split_thinking` separates the reasoning block from the answer after it; the reward
stage passes both to every reward function as `completion_thinking` and `completion_answer`.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def encode_chat(
    tokenizer,
    text: str,
    *,
    system_prompt: str | None = None,
    template_kwargs: Mapping | None = None,
) -> list[int]:
    """Token ids of `text` as a user turn in the tokenizer's chat template, ready to generate."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (data.use_chat_template=true)")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **dict(template_kwargs or {})
    )
    # transformers 5 may return a BatchEncoding-like mapping for tokenize=True.
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return list(ids)
