import math

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
    scores = mx.array([[1.0], [0.0], [1.0], [1.0]])
    metrics = rewards.reward_metrics(scores, ["exact_answer"], [1.0], group_size=2)
    assert metrics["reward"] == pytest.approx(0.75)
    assert metrics["frac_reward_zero_std"] == pytest.approx(0.5)  # second group all equal
    assert metrics["reward_std"] == pytest.approx(np.std([1, 0], ddof=1) / 2)
    assert metrics["rewards/exact_answer/mean"] == pytest.approx(0.75)
