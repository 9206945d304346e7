"""Reward functions with TRL's signature, a registry of built-ins, and scoring.

A reward function is `fn(prompts: list[str], completions: list[str], **columns) -> list[float |
None]`, where `columns` are the dataset columns of each row (e.g. `answer`). `None` means "does not
apply to this sample" and becomes NaN in the score matrix. An exception inside a function is
never turned into a silent 0: it stops scoring with an error naming the function.

Multi-turn completions (tools, environments) reach the functions as TRL passes them: each
prompt as its chat messages and each completion as its list of messages after the prompt
(assistant turns with their tool_calls, tool results); `environments=` holds each row's
environment object. The built-ins read a conversation's last assistant message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stages.chat import completion_parts
from stages.settings import FieldError, check, import_callable, one_of, setting

import mlx.core as mx

RewardFunc = Callable[..., list]
REGISTRY: dict[str, RewardFunc] = {}


def register(name: str):
    """Decorator: make a reward function available by `name` in configs."""

    def add(fn: RewardFunc) -> RewardFunc:
        REGISTRY[name] = fn
        return fn

    return add


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable."""


ON_ERROR = ("raise", "none")


@dataclass
class RewardFuncConfig:
    """One entry of `reward.funcs`: a built-in (by its key) or a function by import path."""

    weight: float = setting(1.0, "multiplies this function's reward in the weighted sum")
    _target_: str | None = setting(
        None, "import path of a TRL-signature reward function; null: the key names a built-in"
    )
    kwargs: dict[str, Any] = setting(
        factory=dict, help="settings bound to the function, e.g. length's {target: 200}"
    )


@dataclass
class RewardConfig:
    """`reward.*`: the reward functions, their weights, and what a failing one does."""

    funcs: dict[str, RewardFuncConfig] = setting(
        factory=dict, help="name -> {weight, _target_, kwargs}; see conf/reward/*.yaml"
    )
    weights: list[float] | None = setting(
        None, "TRL's reward_weights: a list, one per function in order; overrides each weight"
    )
    timeout: float | None = setting(
        None, "seconds per reward-function call (sync or async); null: no limit"
    )
    on_error: str = setting(
        "raise",
        "raise: stop with an error naming function and sample; "
        "none: record None for the failing samples and report them",
    )

    def validate(self) -> None:
        for name, spec in self.funcs.items():
            check(
                spec._target_ is not None or name in REGISTRY,
                f"funcs.{name}",
                name,
                f"a built-in ({', '.join(sorted(REGISTRY))}) or an entry with _target_",
            )
            if spec._target_ is None:
                try:
                    bind(REGISTRY[name], dict(spec.kwargs), name)
                except (TypeError, ValueError) as error:
                    raise FieldError(f"funcs.{name}.kwargs", rest=f" is invalid: {error}") from None
        if self.weights is not None and len(self.weights) != len(self.funcs):
            raise FieldError(
                "weights",
                rest=f" has {len(self.weights)} values for {len(self.funcs)} reward functions "
                f"({', '.join(self.funcs)}); give one weight per function, in that order",
            )
        one_of("on_error", self.on_error, ON_ERROR)
        check(self.timeout is None or self.timeout > 0, "timeout", self.timeout, "null or > 0")


def completion_text(completion) -> str:
    """The text a reward reads from one completion: the completion itself, or for a
    conversation (multi-turn: a list of messages) its last assistant message's content (TRL's
    built-ins read the first one, which in a tool run is usually the call)."""
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role") == "assistant":
            content = message.get("content") or ""
            return content if isinstance(content, str) else str(content)
    return ""


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FRACTION = re.compile(r"^(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_LATEX_FRACTION = re.compile(r"^(-?)\\d?frac\{(-?\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}$")


def _normalize_number(text: str) -> str | None:
    """Canonical form of a number written like "1,000", "3.50", "$42", "7.", "50%", "-0"."""
    value = parse_number(text)
    if value is None:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def parse_number(text: str) -> float | None:
    """A float from a number as people write answers, or None.

    Accepts thousands separators ("1,000"), trailing zeros ("3.50"), a leading "$" or trailing
    "%", a trailing period, surrounding spaces or `$...$`, and fractions ("3/4", "\frac{3}{4}").
    """
    text = text.strip().strip("$").strip()
    text = text.replace("\\$", "").replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
    text = text.rstrip(".").rstrip("%").replace(",", "").replace(" ", "").lstrip("$")
    fraction = _FRACTION.match(text) or None
    latex = _LATEX_FRACTION.match(text)
    try:
        if latex:
            sign = -1.0 if latex.group(1) else 1.0
            return sign * float(latex.group(2)) / float(latex.group(3))
        if fraction:
            return float(fraction.group(1)) / float(fraction.group(2))
        value = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


@register("exact_answer")
def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list:
    """1.0 when the completion, stripped, is exactly the `answer` column, else 0.0."""
    return [
        float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)
    ]


@register("first_number")
def first_number(prompts: list[str], completions: list[str], answer: list[str], **_) -> list:
    """1.0 when the first number in the completion equals `answer` (numerically), else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = _NUMBER.search(completion_text(completion))
        got = _normalize_number(found.group()) if found else None
        rewards.append(float(got is not None and got == _normalize_number(str(expected))))
    return rewards


@register("gsm8k_answer")
def gsm8k_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list:
    """GSM8K: the last number in the completion equals the number after `####` in `answer`."""
    rewards = []
    for completion, reference in zip(completions, answer):
        expected = _normalize_number(str(reference).split("####")[-1])
        numbers = _NUMBER.findall(completion_text(completion))
        got = _normalize_number(numbers[-1]) if numbers else None
        rewards.append(float(got is not None and got == expected))
    return rewards


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_region(text: str) -> str:
    r"""The part of a completion or reference that holds its final answer: the whole text when it
    has a `\boxed{}` (math-verify reads the last boxed first), else the first line after the last
    "####" (GSM8K), else the inside of the last `<answer>...</answer>`, else the whole text."""
    if "\\boxed" in text:
        return text
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else ""
    tagged = _ANSWER_TAG.findall(text)
    return tagged[-1].strip() if tagged else text


_LATEX_MARK = re.compile(r"[\\^_{]")
# digits, operators, brackets and one-letter variables: "(1,2)", "3x + 1", "[0, 1)"
_PLAIN_MATH = re.compile(r"(?:[\d\s.,+\-*/()\[\]=<>!%]|(?<![A-Za-z])[A-Za-z](?![A-Za-z]))+")


def parse_math(text: str, *, reference: bool = False) -> list:
    r"""math-verify's parse of `text`'s answer region (stages.rewards.answer_region), LaTeX with
    `\boxed{}` first (units normalised, as TRL's accuracy_reward), then plain expressions and
    numbers. A reference without its own `$...$` or `\boxed{}` (a MATH answer column such as
    `\sqrt{2}` or `(1,2)`) is read as LaTeX math first, inside `$...$`, then as plain text; a
    completion region that does not parse but looks like bare LaTeX (a backslash, `^`, `_` or
    `{`) is tried inside `$...$` too. [] when nothing parses."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # math-verify's time limits use SIGALRM, which only the main thread can set (as TRL).
    timeout = 10 if threading.current_thread() is threading.main_thread() else None
    config = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True), boxed_match_priority=0
        ),
        ExprExtractionConfig(),
    ]
    region = answer_region(text).strip()
    bare = bool(region) and "$" not in region and "\\boxed" not in region
    latex_like = bare and bool(_LATEX_MARK.search(region) or _PLAIN_MATH.fullmatch(region))
    attempts = [region]
    if latex_like and reference:
        attempts = [f"${region}$", region]
    elif latex_like and _LATEX_MARK.search(region):
        attempts = [region, f"${region}$"]
    for attempt in attempts:
        parsed = parse(attempt, extraction_config=config, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


@register("math_answer")
def math_answer(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    log_metric: Callable[[str, float], None] | None = None,
    **_,
) -> list:
    r"""Math correctness with math-verify (the library TRL's accuracy_reward is built on): 1.0
    when the completion's answer is mathematically equal to the reference's, else 0.0.

    Both go through `parse_math` (the last `\boxed{}`, else after "####", else inside
    `<answer>` tags, else the whole text; LaTeX or plain) and `math_verify.verify`
    ("\frac{3}{4}" == "0.75", "x^2 + 1" == "x^2+1", "1,000" == "1000"). A completion that does
    not parse scores 0.0; a reference that does not parse gives None (the row is left out, as
    TRL's accuracy_reward), and neither raises. `log_metric` (TRL's reward-function hook) gets
    the counts: rewards/math_answer/parse_failures (completions) and
    rewards/math_answer/reference_parse_failures.
    """
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    rewards, failed, failed_references = [], 0, 0
    for completion, reference in zip(completions, answer):
        try:
            gold = parse_math(str(reference), reference=True)
        except Exception:
            gold = []
        if not gold:
            failed_references += 1
            rewards.append(None)
            continue
        try:
            predicted = parse_math(completion_text(completion))
        except Exception:
            predicted = []
        if not predicted:
            failed += 1
            rewards.append(0.0)
            continue
        try:
            rewards.append(float(verify(gold, predicted, timeout_seconds=timeout)))
        except Exception:
            rewards.append(0.0)
    if log_metric is not None:
        log_metric("rewards/math_answer/parse_failures", float(failed))
        log_metric("rewards/math_answer/reference_parse_failures", float(failed_references))
    return rewards


_THINK_TRL = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)
_FORMAT_STRICT = re.compile(
    r"^<think>\n(?:(?!</?think>).)*?\n</think>\n<answer>\n(?:(?!</?answer>).)*?\n</answer>\n?$",
    re.DOTALL,
)
_FORMAT_SOFT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


@register("think_format")
def think_format(prompts: list[str], completions: list[str], **_) -> list:
    """TRL's think_format_reward: 1.0 when the completion starts with one `<think>...</think>`."""
    return [float(bool(_THINK_TRL.match(completion_text(c)))) for c in completions]


@register("format_strict")
def format_strict(prompts: list[str], completions: list[str], **_) -> list:
    """1.0 for exactly "<think>\n...\n</think>\n<answer>\n...\n</answer>" (one of each, nothing
    around them but a final newline), else 0.0."""
    return [float(bool(_FORMAT_STRICT.match(completion_text(c)))) for c in completions]


@register("format_soft")
def format_soft(prompts: list[str], completions: list[str], **_) -> list:
    """1.0 when the completion contains "<think>...</think>" followed by "<answer>...</answer>"
    (any whitespace, any text around them), else 0.0."""
    return [float(bool(_FORMAT_SOFT.search(completion_text(c)))) for c in completions]


@register("length")
def length(
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    target: int | None = None,
    max_length: int | None = None,
    cache: int = 0,
    **_,
) -> list:
    """Length in completion tokens (characters when no token ids are given). Set one of:

    target=n: 1 - |length - n| / n, floored at 0 (1.0 exactly on target);
    max_length=L (and cache=C): DAPO's soft overlong punishment, 0 up to L - C tokens, then
    falling linearly to -1 at L, and -1 beyond.
    """
    _check_length_settings(target=target, max_length=max_length, cache=cache)
    if completion_ids:
        sizes = [len(ids) for ids in completion_ids]
    else:
        sizes = [len(completion_text(c)) for c in completions]
    if target is not None:
        return [max(0.0, 1.0 - abs(n - target) / target) for n in sizes]
    limit = max_length - cache
    return [
        0.0 if n <= limit else (-1.0 if n > max_length else (limit - n) / max(cache, 1))
        for n in sizes
    ]


def _check_length_settings(target=None, max_length=None, cache=0) -> None:
    if (target is None) == (max_length is None):
        raise ValueError("length needs exactly one of target or max_length")
    if target is not None and target < 1:
        raise ValueError(f"length target must be >= 1, got {target}")
    if max_length is not None and not 0 <= cache < max_length:
        raise ValueError(f"length cache must be in [0, max_length), got {cache}")


length.check_settings = _check_length_settings

_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


@register("valid_json")
def valid_json(prompts: list[str], completions: list[str], **_) -> list:
    """1.0 when the completion (stripped; a ```json fence around it is allowed) is one JSON
    object or array, else 0.0."""
    rewards = []
    for completion in completions:
        text = completion_text(completion).strip()
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1).strip()
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            rewards.append(0.0)
            continue
        rewards.append(float(isinstance(value, (dict, list))))
    return rewards


def resolve(spec: str | RewardFunc) -> tuple[str, RewardFunc]:
    """(name, function) for a registry name, an import path `pkg.module.fn`, or a callable."""
    if callable(spec):
        return getattr(spec, "__name__", "reward"), spec
    fn = import_callable(spec, "reward", REGISTRY, "my_package.rewards.my_reward")
    return (spec if spec in REGISTRY else spec.rpartition(".")[2]), fn


def bind(fn: RewardFunc, settings: dict | None, name: str | None = None) -> RewardFunc:
    """`fn` with keyword settings fixed (e.g. length's target). Unknown names are an error."""
    settings = settings or {}
    check = getattr(fn, "check_settings", None)
    if not settings:
        if check is not None:
            check()
        return fn
    label = name or getattr(fn, "__name__", "reward")
    parameters = inspect.signature(fn).parameters
    # Built-ins swallow dataset columns with **_, so only their named parameters are settings.
    builtin = fn in REGISTRY.values()
    accepts_any = not builtin and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    unknown = [key for key in settings if key not in parameters]
    if unknown and not accepts_any:
        raise ValueError(
            f"reward {label} has no setting {unknown[0]!r}; its parameters are "
            f"{[p for p in parameters if p not in ('prompts', 'completions')]}"
        )
    if check is not None:
        check(**settings)
    bound = functools.partial(fn, **settings)
    functools.update_wrapper(bound, fn)
    return bound


@dataclass
class RewardFuncs:
    """The reward functions a RewardConfig names, ready to call (settings bound), in order."""

    funcs: list[RewardFunc]
    names: list[str]
    weights: list[float]  # reward.weights if given, else each function's weight


def resolve_funcs(cfg: RewardConfig) -> RewardFuncs:
    """Import or look up every function of `cfg.funcs` and bind its kwargs. Raises ValueError
    naming the entry (`reward.funcs.<name>: ...`) when one cannot be resolved."""
    funcs, names, weights = [], [], []
    for name, spec in cfg.funcs.items():
        try:
            _, fn = resolve(spec._target_ or name)
            fn = bind(fn, dict(spec.kwargs), name)
        except (TypeError, ValueError) as error:
            raise ValueError(f"reward.funcs.{name}: {error}") from None
        funcs.append(fn)
        names.append(name)
        weights.append(spec.weight)
    if cfg.weights is not None:
        weights = [float(w) for w in cfg.weights]
    return RewardFuncs(funcs, names, weights)


PASSED = ("prompts", "completions", "completion_ids", "log_metric", "environments")


def required_columns(fn: RewardFunc) -> list[str]:
    """Dataset columns a reward function needs: its parameters without defaults, other than
    prompts, completions, completion_ids, log_metric and environments (TRL passes those)."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    bound = fn.keywords if isinstance(fn, functools.partial) else {}
    names = []
    for name, parameter in inspect.signature(target).parameters.items():
        if name in PASSED or name in bound:
            continue
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if parameter.default is inspect.Parameter.empty:
            names.append(name)
    return names


@dataclass
class RewardFailure:
    """One reward function failing on one sample (or the whole batch: sample None)."""

    function: str
    sample: int | None
    error: str
    prompt: str = ""
    completion: str = ""

    def describe(self) -> str:
        """One line: "reward function f raised KeyError: 'x' on sample 3 (prompt ..., ...)"."""
        where = "the whole batch" if self.sample is None else f"sample {self.sample}"
        text = f"reward function {self.function} {self.error} on {where}"
        if self.sample is not None:
            text += f" (prompt {self.prompt[:60]!r}, completion {self.completion[:60]!r})"
        return text


class _Timeout(Exception):
    pass


def _is_async(fn) -> bool:
    target = fn.func if isinstance(fn, functools.partial) else fn
    if inspect.iscoroutinefunction(target):
        return True
    return not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)


def _run_coroutine(coroutine):
    """asyncio.run, also from inside a running event loop (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _call(fn, kwargs: dict, timeout: float | None):
    """One call of a reward function with an optional time limit (raises _Timeout).

    Async functions are awaited under asyncio.wait_for. A sync function with a time limit runs
    on a daemon thread; when it overruns, the run moves on without it (Python cannot stop a
    thread), so its result is discarded.
    """
    if _is_async(fn):

        async def limited():
            try:
                return await asyncio.wait_for(fn(**kwargs), timeout)
            except TimeoutError:
                raise _Timeout() from None

        return _run_coroutine(limited())
    if timeout is None:
        result = fn(**kwargs)
        if inspect.isawaitable(result):
            return _run_coroutine(_await(result))
        return result
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(**kwargs)
        except BaseException as error:  # re-raised on the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=target, daemon=True, name="reward-call")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _Timeout()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def _await(awaitable):
    return await awaitable


def _values(name: str, values, n: int) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward function {name} returned {type(values).__name__}; expected a list"
        ) from None
    if len(values) != n:
        raise RewardError(
            f"reward function {name} returned {len(values)} values for {n} completions"
        )
    column = []
    for i, value in enumerate(values):
        if value is None:
            column.append(math.nan)
            continue
        try:
            column.append(float(value))
        except (TypeError, ValueError):
            raise RewardError(
                f"reward function {name} returned {value!r} for sample {i}; "
                "expected a number or None"
            ) from None
    return column


def run_rewards(
    batch,
    reward_funcs: Sequence[RewardFunc],
    names: Sequence[str] | None = None,
    *,
    timeout: float | None = None,
    on_error: str = "raise",
    metrics: dict[str, float] | None = None,
) -> tuple[mx.array, list[RewardFailure]]:
    """Every reward function on the batch: ((N, F) float32 scores, NaN where None; failures).

    Functions get TRL's arguments: prompts, completions, completion_ids (token ids without
    padding; a multi-turn completion's tool tokens included, as TRL) and the dataset columns;
    multi-turn batches pass prompts and completions as messages, and `environments`. When a
    call raises, it is repeated one sample at a time to find the samples that fail.
    on_error="raise" stops with a RewardError naming the function
    and the first failing sample; on_error="none" records None for the failing samples (all of
    them when the call timed out) and returns one RewardFailure per failure.
    A function that returns the wrong number of values or non-numbers always raises.
    `metrics`: filled with what the functions logged through `log_metric(name, value)` (TRL's
    hook, passed to every function): the mean of each name's values over the calls.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r} is not one of {', '.join(ON_ERROR)}")
    n = len(batch.texts)
    names = (
        list(names)
        if names is not None
        else [getattr(fn, "__name__", repr(fn)) for fn in reward_funcs]
    )
    completion_ids = _completion_ids(batch)
    # Multi-turn (TRL): prompts as chat messages, completions as the messages after the prompt.
    conversations = getattr(batch, "conversations", None)
    completions = batch.texts if conversations is None else conversations
    prompt_messages = getattr(batch, "prompt_messages", None)
    prompts = batch.prompt_texts if prompt_messages is None else prompt_messages
    extra = {}
    if getattr(batch, "environments", None) is not None:
        extra["environments"] = batch.environments  # TRL's keyword
    # The parsed parts of thinking-mode completions: <think>...</think> and the answer after it.
    parts = completion_parts([completion_text(c) for c in completions])
    columns, failures = [], []
    logged: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(name, []).append(float(value))

    for fn, name in zip(reward_funcs, names):
        kwargs = dict(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            log_metric=log_metric,
            **parts,
            **extra,
            **batch.columns,
        )
        try:
            columns.append(_values(name, _call(fn, kwargs, timeout), n))
            continue
        except RewardError:
            raise
        except _Timeout:
            failure = RewardFailure(name, None, f"timed out after {timeout:g}s")
            if on_error == "raise":
                raise RewardError(
                    failure.describe() + "; increase reward.timeout or make it faster"
                ) from None
            failures.append(failure)
            columns.append([math.nan] * n)
            continue
        except Exception as error:
            batch_error = error
        column, found = _per_sample(fn, name, batch, kwargs, timeout, batch_error)
        if on_error == "raise":
            first = found[0] if found else RewardFailure(name, None, _describe(batch_error))
            raise RewardError(first.describe()) from batch_error
        failures.extend(found)
        columns.append(column)
    scores = mx.array(columns, dtype=mx.float32).T.reshape(n, len(reward_funcs))
    if metrics is not None:
        metrics.update({key: sum(values) / len(values) for key, values in logged.items()})
    return scores, failures


def _describe(error: BaseException) -> str:
    return f"raised {type(error).__name__}: {error}"


def _per_sample(fn, name, batch, kwargs, timeout, batch_error):
    """Call fn on each sample alone to find which ones fail; (column, failures)."""
    n = len(batch.texts)
    column, failures = [], []
    for i in range(n):
        single = {
            k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()
        }
        try:
            column.extend(_values(name, _call(fn, single, timeout), 1))
            continue
        except RewardError:
            raise
        except _Timeout:
            message = f"timed out after {timeout:g}s"
        except Exception as error:
            message = _describe(error)
        column.append(math.nan)
        failures.append(RewardFailure(name, i, message, batch.prompt_texts[i], batch.texts[i]))
    if not failures:  # fails on the batch only: blame the batch
        failures.append(RewardFailure(name, None, _describe(batch_error)))
        column = [math.nan] * n
    return column, failures


def _completion_ids(batch) -> list[list[int]]:
    ids = getattr(batch, "completion_ids", None)
    mask = getattr(batch, "completion_mask", None)
    if ids is None or mask is None:
        return [[] for _ in batch.texts]
    lengths = mx.array(mask).sum(axis=1).astype(mx.int32).tolist()
    return [row[:n] for row, n in zip(mx.array(ids).tolist(), lengths)]


def score(batch, reward_funcs: Sequence[RewardFunc], weights: Sequence[float]) -> mx.array:
    """Run every reward function on the batch. Returns (N, n_funcs) float32, NaN where None.

    `batch` is a RolloutBatch (prompt_texts, texts, columns). `weights` must match
    `reward_funcs` one to one; they are applied by `combine`, not here, so per-function
    metrics stay unweighted as in TRL. Any failure raises RewardError (see `run_rewards`).
    """
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_funcs)} reward functions")
    return run_rewards(batch, reward_funcs)[0]


def combine(rewards: mx.array, weights: Sequence[float]) -> mx.array:
    """Weighted sum over functions, ignoring NaN (TRL's nansum). (N, F) -> (N,).

    A row where every function returned None sums to 0 here; advantages leave such rows out.
    """
    weighted = rewards * mx.array(weights, dtype=mx.float32)[None, :]
    return mx.where(mx.isnan(weighted), 0.0, weighted).sum(axis=1)


def reward_metrics(
    rewards: mx.array, names: Sequence[str], weights: Sequence[float], group_size: int = 0
) -> dict[str, float]:
    """TRL's reward metrics for an (N, F) score matrix (NaN = None).

    reward / reward_std: mean and std (ddof=1) over the batch of the weighted total, leaving out
    rows where every function returned None; rewards/<fn>/mean and /std: per function,
    ignoring None. (frac_reward_zero_std comes with the advantages: it depends on the std used.)
    `group_size` is accepted for compatibility and unused.
    """
    import numpy as np

    matrix = np.array(rewards, dtype=np.float64)
    total = np.array(combine(rewards, weights), dtype=np.float64)
    total = total[~np.isnan(matrix).all(axis=1)]
    metrics = {
        "reward": float(total.mean()) if total.size else math.nan,
        "reward_std": float(total.std(ddof=1)) if total.size > 1 else math.nan,
    }
    for i, name in enumerate(names):
        column = matrix[:, i][~np.isnan(matrix[:, i])]
        metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.size else math.nan
        metrics[f"rewards/{name}/std"] = float(column.std(ddof=1)) if column.size > 1 else math.nan
    return metrics
