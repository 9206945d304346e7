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


def test_sampled_eval_reports_pass_at_k(tiny):
    model, tokenizer, rows, prompts = _setup(tiny, n=4)
    always = lambda prompts, completions, **_: [1.0] * len(completions)  # noqa: E731
    result = evaluate(
        model,
        tokenizer,
        prompts,
        rows,
        [rewards.exact_answer, always],
        ["exact_answer", "always"],
        [1.0, 0.0],
        RolloutConfig(max_new_tokens=3, temperature=1.0),
        EvalConfig(num_samples=3, accuracy_reward="always"),
        seed=1,
    )
    assert result.metrics["eval/pass@3"] == 1.0 and result.metrics["eval/accuracy"] == 1.0
    with pytest.raises(ValueError, match="accuracy_reward 'nope'"):
        evaluate(
            model,
            tokenizer,
            prompts,
            rows,
            [always],
            ["always"],
            [1.0],
            RolloutConfig(),
            EvalConfig(accuracy_reward="nope"),
        )


def test_pass_at_k_estimator():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(3, 1, 3) == 1.0
