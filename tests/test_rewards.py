import asyncio
import math
import time

from stages import rewards
from stages.rollout import RolloutBatch

import mlx.core as mx
import numpy as np
import pytest


def _batch(completions, answers, group_size=2):
    n = len(completions)
    return RolloutBatch(
        prompt_ids=[[1]] * n,
        completion_ids=mx.zeros((n, 1), dtype=mx.int32),
        completion_mask=mx.ones((n, 1)),
        logprobs=mx.zeros((n, 1)),
        finish_reasons=["stop"] * n,
        prompt_texts=["p"] * n,
        texts=completions,
        group_size=group_size,
        columns={"answer": answers},
    )


def test_builtin_rewards():
    assert rewards.exact_answer([""] * 3, [" 7", "7 ", "77"], ["7", "7", "7"]) == [1.0, 1.0, 0.0]
    assert rewards.first_number(
        [""] * 4, ["x 12 and 3", "1,000!", "3.50", "none"], ["12", "1000", "3.5", "0"]
    ) == [1.0, 1.0, 1.0, 0.0]
    assert rewards.gsm8k_answer(
        [""] * 3, ["so 4 then 1,234", "42", "no number"], ["...#### 1234", "#### 41", "#### 3"]
    ) == [1.0, 0.0, 0.0]


MATH_CASES = [
    # (completion, reference, expected)
    # the cases: the reference is parsed as itself, never by its last number
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}", 1.0),
    ("\\boxed{3}", "\\frac{14}{3}", 0.0),
    ("\\boxed{2}", "\\sqrt{2}", 0.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("\\boxed{1}", "x^2+1", 0.0),
    ("\\frac{3}{4}", "0.75", 1.0),
    ("\\boxed{x^2 + 1}", "\\boxed{x^2+1}", 1.0),
    # MATH-style references: a solution ending in \boxed{}, or a bare LaTeX answer column
    ("so \\boxed{\\dfrac{\\pi}{2}}", "The angle is $\\boxed{\\frac{\\pi}{2}}$.", 1.0),
    ("The answer is \\boxed{2\\sqrt{3}}", "2\\sqrt{3}", 1.0),
    ("The answer is \\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),  # equal by value
    ("\\boxed{(1,2)}", "(1,2)", 1.0),
    ("\\boxed{[1,2]}", "(1,2)", 0.0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    # GSM8K: "#### n" in the reference (and in completions)
    ("so the total is \\boxed{1,000}.", "#### 1000", 1.0),
    ("The answer: 3.50", "#### 3.5", 1.0),
    ("#### 42", "42", 1.0),
    ("48 + 24 = 72\n#### 72\nthat is 3 more than 69", "Natalia sold ... clips.\n#### 72", 1.0),
    ("first 12, then 13", "#### 13", 1.0),  # the last number
    ("first 13, then 12", "#### 13", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\text{yes}}", "\\boxed{\\text{yes}}", 1.0),
    ("<answer>It is $1,234.</answer>", "#### 1234", 1.0),
    ("<answer>7</answer>", "#### 7", 1.0),
    ("costs $5 each, 20% off, so 4", "#### 4", 1.0),
    ("-7", "#### -7", 1.0),
    ("\\boxed{12} wait no, 13", "#### 12", 1.0),  # boxed wins over later numbers
    ("1,000,000", "1000000", 1.0),
    ("3/4", "0.75", 1.0),
]


@pytest.mark.parametrize("completion, reference, expected", MATH_CASES)
def test_math_answer_on_tricky_strings(completion, reference, expected):
    assert rewards.math_answer([""], [completion], [reference]) == [expected]


def test_math_answer_parse_failures_are_zero_or_none_and_counted():
    """A completion math-verify cannot parse scores 0 and counts as a parse failure; a reference
    it cannot parse gives None (TRL's accuracy_reward) and is counted apart. Nothing raises."""
    logged = {}
    got = rewards.math_answer(
        [""] * 5,
        ["no answer here", "\\boxed{", "", "\\boxed{5}", "\\boxed{5}"],
        ["#### 3", "5", "5", "hello", ""],
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    assert got == [0.0, 0.0, 0.0, None, None]
    assert logged == {
        "rewards/math_answer/parse_failures": 3.0,
        "rewards/math_answer/reference_parse_failures": 2.0,
    }


def test_math_answer_counts_reach_the_reward_metrics(tiny):
    batch = _batch(["\\boxed{5}", "nothing", "5", "x"], ["5", "5", "what", "#### 2"])
    logged = {}
    scores, failures = rewards.run_rewards(
        batch, [rewards.math_answer], ["math_answer"], metrics=logged
    )
    values = np.array(scores)[:, 0]
    assert values[[0, 1, 3]].tolist() == [1.0, 0.0, 0.0] and np.isnan(values[2])
    assert not failures
    assert logged == {
        "rewards/math_answer/parse_failures": 2.0,
        "rewards/math_answer/reference_parse_failures": 1.0,
    }


def test_math_answer_runs_off_the_main_thread():
    """math-verify's time limits need the main thread (SIGALRM); a reward.timeout runs the
    function on a helper thread, where math_answer must still score, not raise."""
    batch = _batch(["\\boxed{\\frac{1}{2}}", "0.4"], ["0.5", "0.5"])
    scores, failures = rewards.run_rewards(batch, [rewards.math_answer], ["m"], timeout=30)
    assert np.array(scores)[:, 0].tolist() == [1.0, 0.0] and not failures


def test_number_parsing():
    assert rewards.parse_number("1,000") == 1000.0
    assert rewards.parse_number(" $3.50. ") == 3.5
    assert rewards.parse_number("50%") == 50.0
    assert rewards.parse_number("\\frac{3}{4}") == 0.75
    assert rewards.parse_number("-\\frac{1}{2}") == -0.5
    assert rewards.parse_number("1/0") is None
    assert rewards.parse_number("abc") is None and rewards.parse_number("inf") is None
    assert rewards.answer_region("a \\boxed{1} b") == "a \\boxed{1} b"
    assert rewards.answer_region("work\n#### 72\nmore") == "72"
    assert rewards.answer_region("<answer>1</answer> <answer> 2 </answer>") == "2"


def test_format_rewards_strict_soft_and_trl_think():
    good = "<think>\nadd them\n</think>\n<answer>\n7\n</answer>"
    cases = [
        good,
        good + "\n",
        "<think>add</think><answer>7</answer>",  # soft only
        "Sure! <think>a</think>\n\n<answer>7</answer> done",  # soft only
        "<answer>7</answer><think>a</think>",  # wrong order
        "<think>\na\n</think>\n<answer>\n7\n</answer>\n<answer>\n8\n</answer>",  # two answers
        "<think>\n<think>a\n</think>\n<answer>\n7\n</answer>",  # nested think
        "",
    ]
    assert rewards.format_strict([""] * 8, cases) == [1.0, 1.0, 0, 0, 0, 0, 0, 0]
    assert rewards.format_soft([""] * 8, cases) == [1.0, 1.0, 1.0, 1.0, 0, 1.0, 1.0, 0]
    assert rewards.think_format(
        [""] * 4, ["<think>a</think>b", "x<think>a</think>", "<think>a<think>b</think>", good]
    ) == [1.0, 0.0, 0.0, 1.0]


def test_length_target_and_soft_overlong_penalty():
    texts = ["a" * n for n in (5, 10, 15, 30)]
    assert rewards.length([""] * 4, texts, target=10) == [0.5, 1.0, 0.5, 0.0]
    ids = [[1] * n for n in (6, 8, 10, 11)]
    assert rewards.length([""] * 4, texts, ids, max_length=10, cache=4) == [0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="exactly one of target or max_length"):
        rewards.length([""], ["a"])
    with pytest.raises(ValueError, match="no setting 'tagret'"):
        rewards.bind(rewards.length, {"tagret": 3}, "length")
    with pytest.raises(ValueError, match="cache must be in"):
        rewards.bind(rewards.length, {"max_length": 4, "cache": 4}, "length")
    bound = rewards.bind(rewards.length, {"target": 2}, "length")
    assert bound([""], ["ab"]) == [1.0] and bound.__name__ == "length"


def test_valid_json():
    texts = [
        '{"a": [1, 2]}',
        '```json\n{"a": 1}\n```',
        "[1, 2]",
        '{"a": 1',
        "42",  # a scalar is not a JSON document we reward
        'Here: {"a": 1}',
        "",
    ]
    assert rewards.valid_json([""] * 7, texts) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_required_columns():
    assert rewards.required_columns(rewards.math_answer) == ["answer"]
    assert rewards.required_columns(rewards.format_soft) == []
    assert rewards.required_columns(rewards.bind(rewards.length, {"target": 3})) == []

    def custom(prompts, completions, solution, difficulty=1, **kwargs):
        return []

    assert rewards.required_columns(custom) == ["solution"]


def test_score_matrix_with_none_as_nan():
    def half(prompts, completions, **_):
        return [None if i % 2 else 0.5 for i in range(len(completions))]

    scores = rewards.score(
        _batch(["7", "3", "7", "7"], ["7"] * 4), [rewards.exact_answer, half], [1.0, 2.0]
    )
    values = np.array(scores)
    assert values.shape == (4, 2)
    assert values[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert values[0, 1] == 0.5 and math.isnan(values[1, 1])
    total = np.array(rewards.combine(scores, [1.0, 2.0]))
    assert total.tolist() == [2.0, 0.0, 2.0, 1.0]  # NaN contributes nothing


def test_failing_reward_is_reported_never_zeroed():
    def broken(prompts, completions, **_):
        raise KeyError("missing")

    with pytest.raises(rewards.RewardError, match="reward function broken raised KeyError"):
        rewards.score(_batch(["1", "2"], ["1", "1"]), [broken], [1.0])

    def wrong_length(prompts, completions, **_):
        return [1.0]

    with pytest.raises(rewards.RewardError, match="returned 1 values for 2"):
        rewards.score(_batch(["1", "2"], ["1", "1"]), [wrong_length], [1.0])

    def not_a_number(prompts, completions, **_):
        return ["high", 1.0]

    with pytest.raises(rewards.RewardError, match="returned 'high' for sample 0"):
        rewards.score(_batch(["1", "2"], ["1", "1"]), [not_a_number], [1.0])


def _picky(prompts, completions, **_):
    """Fails on any completion containing "x"."""
    if any("x" in c for c in completions):
        raise ValueError("cannot parse")
    return [float(len(c)) for c in completions]


def test_raise_names_the_function_and_the_failing_sample():
    batch = _batch(["aa", "bx", "c", "dx"], ["1"] * 4)
    with pytest.raises(rewards.RewardError) as error:
        rewards.run_rewards(batch, [_picky], ["picky"])
    message = str(error.value)
    assert "reward function picky raised ValueError: cannot parse on sample 1" in message
    assert "completion 'bx'" in message and "\n" not in message


def test_on_error_none_records_none_for_failing_samples_only():
    batch = _batch(["aa", "bx", "c", "dx"], ["1"] * 4)
    scores, failures = rewards.run_rewards(
        batch, [_picky, rewards.exact_answer], ["picky", "exact"], on_error="none"
    )
    values = np.array(scores)
    assert values[[0, 2], 0].tolist() == [2.0, 1.0]
    assert np.isnan(values[[1, 3], 0]).all()
    assert [(f.function, f.sample) for f in failures] == [("picky", 1), ("picky", 3)]
    assert values[:, 1].tolist() == [0.0, 0.0, 0.0, 0.0]  # other functions unaffected


def test_async_reward_and_completion_ids_are_passed():
    async def async_len(prompts, completions, completion_ids, **_):
        await asyncio.sleep(0)
        return [float(len(ids)) for ids in completion_ids]

    batch = _batch(["a", "b"], ["1", "1"])
    batch.completion_ids = mx.array([[5, 6, 7], [8, 0, 0]])
    batch.completion_mask = mx.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    scores, _ = rewards.run_rewards(batch, [async_len], ["async_len"])
    assert np.array(scores)[:, 0].tolist() == [3.0, 1.0]


def test_timeouts_for_async_and_sync_functions():
    async def slow_async(prompts, completions, **_):
        await asyncio.sleep(5)
        return [1.0] * len(completions)

    def slow_sync(prompts, completions, **_):
        time.sleep(5)
        return [1.0] * len(completions)

    batch = _batch(["a", "b"], ["1", "1"])
    for fn in (slow_async, slow_sync):
        start = time.perf_counter()
        with pytest.raises(rewards.RewardError, match=f"{fn.__name__} timed out after 0.2s"):
            rewards.run_rewards(batch, [fn], [fn.__name__], timeout=0.2)
        scores, failures = rewards.run_rewards(
            batch, [fn], [fn.__name__], timeout=0.2, on_error="none"
        )
        assert time.perf_counter() - start < 2.0
        assert np.isnan(np.array(scores)).all()
        assert failures[0].sample is None and "timed out" in failures[0].describe()


def test_weights_must_match():
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        rewards.score(_batch(["1"], ["1"], 1), [rewards.exact_answer], [1.0, 1.0])


def test_resolve_registry_import_path_and_errors():
    assert rewards.resolve("exact_answer")[1] is rewards.exact_answer
    name, fn = rewards.resolve("stages.rewards.gsm8k_answer")
    assert name == "gsm8k_answer" and fn is rewards.gsm8k_answer
    with pytest.raises(ValueError, match="not a built-in"):
        rewards.resolve("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        rewards.resolve("no_such_module.fn")


def test_reward_metrics_trl_names():
    scores = mx.array([[1.0, np.nan], [0.0, 2.0], [1.0, np.nan], [np.nan, np.nan]])
    metrics = rewards.reward_metrics(scores, ["exact_answer", "other"], [1.0, 0.5])
    totals = [1.0, 1.0, 1.0]  # the all-None row is left out
    assert metrics["reward"] == pytest.approx(np.mean(totals))
    assert metrics["reward_std"] == pytest.approx(np.std(totals, ddof=1))
    assert metrics["rewards/exact_answer/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/exact_answer/std"] == pytest.approx(np.std([1, 0, 1], ddof=1))
    assert metrics["rewards/other/mean"] == pytest.approx(2.0)
