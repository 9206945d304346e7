import math

from stages import data, rewards
from stages.evaluate import EvalConfig, evaluate, pass_at_k
from stages.rollout import RolloutConfig, generate_rollouts

import numpy as np
import pytest


def _setup(tiny, n=6):
    model, tokenizer = tiny
    rows = data.arithmetic_rows(n, seed=5)
    prompts = [tokenizer.encode(r["prompt"]) for r in rows]
    return model, tokenizer, rows, prompts


def test_greedy_eval_matches_greedy_generation_and_scores_it(tiny):
    model, tokenizer, rows, prompts = _setup(tiny)
    funcs = [rewards.exact_answer, rewards.first_number]
    result = evaluate(
        model,
        tokenizer,
        prompts,
        rows,
        funcs,
        ["exact_answer", "first_number"],
        [1.0, 0.5],
        RolloutConfig(max_new_tokens=4, temperature=1.0),
        EvalConfig(batch_size=4, table_rows=3),  # two generate calls
    )
    greedy = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=1, max_new_tokens=4, temperature=0)
    )
    assert result.table["completion"] == greedy.texts[:3]
    exact = rewards.exact_answer([], greedy.texts, [r["answer"] for r in rows])
    first = rewards.first_number([], greedy.texts, [r["answer"] for r in rows])
    m = result.metrics
    assert m["eval/accuracy"] == pytest.approx(np.mean(exact))
    assert m["eval/rewards/exact_answer/mean"] == pytest.approx(np.mean(exact))
    assert m["eval/rewards/first_number/mean"] == pytest.approx(np.mean(first))
    totals = np.array(exact) + 0.5 * np.array(first)
    assert m["eval/reward"] == pytest.approx(totals.mean())
    assert m["eval/num_prompts"] == 6 and "eval/pass@1" not in m
    assert len(result.table["prompt"]) == 3 and set(result.table) >= {"reward", "correct"}


def _starts_with_sum_digit(prompts, completions, answer, **_):
    """1 when the completion's first character is the answer's last digit: right on some
    samples and wrong on others for the untrained tiny model."""
    return [float(c[:1] == a[-1:]) for c, a in zip(completions, answer)]


def test_sampled_eval_reports_pass_at_k(tiny):
    """pass@k and accuracy against the same samples drawn again with generate_rollouts: the
    fraction of prompts with a correct completion among k, and of correct completions."""
    model, tokenizer, rows, prompts = _setup(tiny, n=6)
    k = 3
    settings = RolloutConfig(max_new_tokens=3, temperature=1.0)
    result = evaluate(
        model,
        tokenizer,
        prompts,
        rows,
        [_starts_with_sum_digit, rewards.exact_answer],
        ["digit", "exact_answer"],
        [1.0, 0.0],
        settings,
        EvalConfig(num_samples=k, batch_size=16, table_rows=100),
        seed=1,
    )
    again = generate_rollouts(
        model, tokenizer, prompts, RolloutConfig(group_size=k, max_new_tokens=3), seed=1
    )
    assert result.table["completion"] == again.texts  # the same samples
    answers = [r["answer"] for r in rows for _ in range(k)]
    correct = np.array(_starts_with_sum_digit([], again.texts, answers)).reshape(-1, k)
    expected_pass = float(np.mean(correct.max(axis=1)))
    assert 0.0 < expected_pass < 1.0 and 0.0 < correct.mean() < expected_pass  # a real case
    assert result.metrics[f"eval/pass@{k}"] == pytest.approx(expected_pass)
    assert result.metrics["eval/accuracy"] == pytest.approx(correct.mean())
    with pytest.raises(ValueError, match="accuracy_reward 'nope'"):
        evaluate(
            model,
            tokenizer,
            prompts,
            rows,
            [_starts_with_sum_digit],
            ["digit"],
            [1.0],
            RolloutConfig(),
            EvalConfig(accuracy_reward="nope"),
        )


def test_pass_at_k_estimator():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(3, 1, 3) == 1.0
