"""Multi-turn rollouts: the ragged engine against a full forward, tool rounds in one batch,
masks, budgets, failures, environments, rollout_func, rewards on conversations, metrics, and
the update counting only generated tokens (against TRL's loop over the final transcript)."""

import time

from stages import grpo_update, multiturn, rewards, tools
from stages.advantages import compute_advantages
from stages.data import tool_arithmetic_rows
from stages.fused_decode import RaggedDecoder
from stages.grpo_update import TrainConfig
from stages.load_weights import load, resolve_path
from stages.policy import policy_logprobs
from stages.rollout import RolloutConfig, left_pad

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

# -- the ragged engine --------------------------------------------------------------------------


def _engine_script(engine, model, prompts, rng):
    """Prefill, repeat rows for a group, decode different tokens per row, append tool tokens to
    some rows (different counts), drop rows, decode again; every logits row is checked against
    the model's full forward over that row's tokens."""
    tokens, padding = left_pad(prompts, 0)
    logits = engine.prefill(tokens, padding, 24)
    sequences = [list(p) for p in prompts]

    def check(got, rows):
        for i, row in enumerate(rows):
            want = model(mx.array([sequences[row]]))[0, -1]
            difference = mx.abs(want - got[i]).max().item()
            assert difference < 1e-4, (row, difference)

    check(logits, range(len(prompts)))
    group = [0, 0, 1, 2, 2]  # prompt 0 and 2 shared by two rows each
    engine.filter(mx.array(group))
    sequences = [list(sequences[g]) for g in group]
    for step in range(5):
        new = rng.integers(5, 50, size=len(sequences))
        logits = engine.decode(mx.array(new))
        for row, token in enumerate(new.tolist()):
            sequences[row].append(token)
        check(logits, range(len(sequences)))
        if step in (1, 3):
            rows = [0, 3, 4] if step == 1 else [1]
            added = [
                rng.integers(5, 50, size=n).tolist() for n in ([3, 1, 6] if step == 1 else [4])
            ]
            logits = engine.append(np.array(rows), added)
            for row, extra in zip(rows, added):
                sequences[row] += extra
            check(logits, rows)
    engine.filter(mx.array([4, 1]))
    sequences = [sequences[4], sequences[1]]
    new = rng.integers(5, 50, size=2)
    logits = engine.decode(mx.array(new))
    for row, token in enumerate(new.tolist()):
        sequences[row].append(token)
    check(logits, [0, 1])


@pytest.mark.parametrize("name", ["builtin:tiny_qwen3", "builtin:tiny_qwen3_moe"])
@pytest.mark.parametrize("engine", ["fused", "mlx_lm"])
def test_engines_append_per_row_and_equal_a_full_forward(name, engine):
    model, tokenizer = load(name, dtype="float32")
    prompts = [tokenizer.encode(t) for t in ["1+2=", "33+4=", "2+2=7+1="]]
    chosen = multiturn.make_engine(model, RolloutConfig(engine=engine))
    assert isinstance(chosen, RaggedDecoder if engine == "fused" else multiturn.ReprefillEngine)
    _engine_script(chosen, model, prompts, np.random.default_rng(0))


def test_append_past_the_allocated_cache_is_an_error(tiny):
    model, tokenizer = tiny
    engine = RaggedDecoder(model)
    tokens, padding = left_pad([tokenizer.encode("1+2=")], 0)
    engine.prefill(tokens, padding, 4)
    with pytest.raises(ValueError, match="do not fit in the cache"):
        engine.append(np.array([0]), [[5] * 5])


# -- multi-turn rollouts on the tools model --------------------------------------------------------


@pytest.fixture(scope="module")
def tools_model(tools_path):
    return load(tools_path, dtype="float32")


ROWS = tool_arithmetic_rows(3, seed=4)
TOOLS = RolloutConfig(group_size=4, max_new_tokens=64, max_completion_length=128, tools=["add"])


def _rollout(tools_model, cfg=TOOLS, rows=ROWS, seed=3, **placement):
    model, tokenizer = tools_model
    turns = multiturn.setup(cfg, tokenizer)
    return multiturn.generate(model, tokenizer, rows, cfg, turns, seed=seed, **placement)


def test_a_tool_round_is_run_and_its_tokens_are_context(tools_model):
    model, tokenizer = tools_model
    batch = _rollout(tools_model)
    assert batch.num_rows == 12 and batch.engine == "fused"
    completion = np.array(batch.completion_mask)
    generated = np.array(batch.tool_mask)
    logprobs = np.array(batch.logprobs)
    ids = np.array(batch.completion_ids)
    for row, conversation in enumerate(batch.conversations):
        call_turn, tool_message, answer = conversation
        (call,) = call_turn["tool_calls"]
        arguments = call["function"]["arguments"]
        assert tool_message == {
            "role": "tool",
            "name": "add",
            "content": str(arguments["a"] + arguments["b"]),
        }
        assert answer["role"] == "assistant" and "tool_calls" not in answer
        n = int(completion[row].sum())
        flags = generated[row, :n]
        suffix = tools.tool_suffix_ids(tokenizer, [tool_message])
        start = int(np.argmin(flags))  # the first tool token
        assert flags[start : start + len(suffix)].sum() == 0
        assert ids[row, start : start + len(suffix)].tolist() == suffix
        assert flags[:start].all() and flags[start + len(suffix) :].all()
        assert ids[row, start - 1] == tokenizer.eos_token_id  # the call turn ended with EOS
        assert (logprobs[row, :n][flags == 0] == 0).all()
        assert (logprobs[row, :n][flags == 1] < 0).all()
        assert batch.finish_reasons[row] == "stop"
    assert batch.tool_counts["calls"] == [1] * 12 and batch.tool_counts["turns"] == [2] * 12
    assert np.array(batch.generated_mask).sum() == generated[completion > 0].sum()
    assert batch.prompt_messages[0] == [{"role": "user", "content": ROWS[0]["prompt"]}]
    assert batch.columns["answer"] == [row["answer"] for row in ROWS for _ in range(4)]


def test_sampled_logprobs_equal_one_forward_over_the_final_transcript(tools_model):
    """Every turn was generated from the right cache: the sampler's log-probs of the generated
    tokens are the training forward's over the whole transcript (tool tokens as context)."""
    model, _ = tools_model
    batch = _rollout(tools_model, seed=5)
    recomputed = policy_logprobs(model, batch, 1.0)
    mask = batch.generated_mask
    assert (np.array(batch.tool_mask) == 0).any()
    difference = (mx.abs(recomputed - batch.logprobs) * mask).max().item()
    assert difference < 2e-5, difference


def test_fused_and_mlx_lm_engines_give_the_same_conversations(tools_model):
    greedy = RolloutConfig(**{**TOOLS.__dict__, "temperature": 0.0, "group_size": 1})
    fused = _rollout(tools_model, greedy, tool_arithmetic_rows(6, seed=9))
    reference = _rollout(
        tools_model,
        RolloutConfig(**{**greedy.__dict__, "engine": "mlx_lm"}),
        tool_arithmetic_rows(6, seed=9),
    )
    assert (fused.engine, reference.engine) == ("fused", "mlx_lm")
    assert np.array_equal(np.array(fused.completion_ids), np.array(reference.completion_ids))
    assert fused.conversations == reference.conversations
    np.testing.assert_allclose(np.array(fused.logprobs), np.array(reference.logprobs), atol=1e-5)


def test_a_share_of_the_rows_draws_what_the_whole_batch_draws(tools_model):
    whole = _rollout(tools_model, seed=8)
    second = _rollout(tools_model, rows=ROWS[1:2], seed=8, row_offset=4, total_rows=12)
    assert second.texts == whole.texts[4:8]
    np.testing.assert_allclose(np.array(second.logprobs), np.array(whole.logprobs[4:8]), atol=1e-5)


def _with(**changes):
    return RolloutConfig(**{**TOOLS.__dict__, **changes})


def test_budgets_drop_a_tool_round_that_does_not_fit_and_cut_generation(tools_model):
    # the call turn (about 48 tokens) fits in 60, its result (about 40 more) does not: TRL drops
    # the round and the completion ends after the call
    dropped = _rollout(tools_model, _with(max_new_tokens=60, max_completion_length=60))
    assert all(len(c) == 1 and c[0]["tool_calls"] for c in dropped.conversations)
    assert dropped.finish_reasons == ["stop"] * 12
    assert (np.array(dropped.tool_mask)[np.array(dropped.completion_mask) > 0] == 1).all()
    assert dropped.tool_counts["calls"] == [1] * 12  # run, then dropped (as TRL)
    # generated tokens cut mid-call: no call runs
    cut = _rollout(tools_model, _with(max_new_tokens=20, max_completion_length=None))
    assert cut.finish_reasons == ["length"] * 12 and cut.tool_counts["calls"] == [0] * 12
    assert np.array(cut.completion_mask).sum(axis=1).tolist() == [20.0] * 12
    assert cut.completion_ids.shape == (12, 20)  # the width is the completion budget


def test_the_tool_round_limit_ends_completions_after_a_call(tools_model):
    batch = _rollout(tools_model, _with(max_tool_calling_iterations=0))
    assert batch.tool_counts["calls"] == [0] * 12 and batch.finish_reasons == ["stop"] * 12
    assert all(len(c) == 1 and c[0]["tool_calls"] for c in batch.conversations)


def add(a: int, b: int) -> int:
    """Add two integers (an `add` that raises for a > 500 and hangs for b > 900).

    Args:
        a: The first number.
        b: The second number.
    """
    if a > 500:
        raise ValueError("a is too big")
    if b > 900:
        time.sleep(30)
    return a + b


def test_failing_tools_become_error_messages_and_are_counted(tools_model):
    """The model calls `add` (this run's raises or hangs on some arguments); each failure is
    the tool message's text and counted by kind, and a hanging call costs its timeout only."""
    rows = [{"prompt": "600+123=", "answer": "723"}, {"prompt": "100+950=", "answer": "1050"}]
    cfg = _with(tools=["test_multiturn.add"], tool_timeout=0.3, group_size=6)
    start = time.monotonic()
    batch = _rollout(tools_model, cfg, rows=rows)
    assert time.monotonic() - start < 30
    expected = {kind: [0] * 12 for kind in tools.FAILURES}
    for row, conversation in enumerate(batch.conversations):
        call = conversation[0].get("tool_calls")
        if not call:
            continue
        a, b = (call[0]["function"]["arguments"][k] for k in ("a", "b"))
        if a > 500:
            expected["exception"][row] = 1
            assert conversation[1]["content"] == "{'error': 'ValueError: a is too big'}"
        elif b > 900:
            expected["timeout"][row] = 1
            assert conversation[1]["content"] == "{'error': 'add timed out after 0.3s'}"
        else:
            assert conversation[1]["content"] == str(a + b)
    for kind in ("exception", "timeout"):
        assert batch.tool_counts[f"failures/{kind}"] == expected[kind], kind
    assert sum(expected["exception"]) >= 2 and sum(expected["timeout"]) >= 1

    model, tokenizer = tools_model
    turns = multiturn.setup(TOOLS, tokenizer)  # a run whose prompt offers add, but has no add
    schemas = turns.toolbox.schemas()
    turns.toolbox.functions = lambda environment=None: {}
    turns.toolbox.schemas = lambda environment=None: schemas
    batch = multiturn.generate(model, tokenizer, ROWS, TOOLS, turns, seed=3)
    assert batch.tool_counts["failures/unknown_tool"] == [1] * 12
    assert batch.conversations[0][1]["content"] == "{'error': 'Tool add not found.'}"
    metrics = multiturn.tool_metrics(batch)
    counts = {k: sum(v) for k, v in batch.tool_counts.items()}
    failures = sum(counts[f"failures/{kind}"] for kind in tools.FAILURES)
    assert failures == counts["calls"] >= 12  # every call fails: the first one unknown_tool
    assert metrics["tools/call_frequency"] == counts["calls"] / 12
    assert metrics["tools/failure_frequency"] == 1.0
    assert metrics["tools/failures/unknown_tool"] == counts["failures/unknown_tool"] >= 12
    assert metrics["tools/turns_per_row"] == counts["turns"] / 12 >= 2.0
    assert metrics["tools/failures/timeout"] == 0


class AddEnvironment:
    """One episode: the target sum; the model's add calls are recorded."""

    def __init__(self):
        self.calls, self.target = [], None

    def reset(self, **row):
        self.calls, self.target = [], int(row["answer"])
        return "?" if row["prompt"] == ROWS[2]["prompt"] else None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls.append((a, b))
        return a + b

    def get_reward(self) -> float:
        return float(any(a + b == self.target for a, b in self.calls))


def test_each_row_gets_its_own_environment_and_rewards_see_them(tools_model):
    model, tokenizer = tools_model
    cfg = _with(tools=[], environment_factory="test_multiturn.AddEnvironment")
    turns = multiturn.setup(cfg, tokenizer)
    batch = multiturn.generate(model, tokenizer, ROWS, cfg, turns, seed=3)
    environments = batch.environments
    assert len({id(e) for e in environments}) == 12
    for row, environment in enumerate(environments):
        prompt = ROWS[row // 4]["prompt"]
        observed = prompt + "?" if prompt == ROWS[2]["prompt"] else prompt  # TRL: appended
        assert batch.prompt_messages[row] == [{"role": "user", "content": observed}]
        calls = [
            (call["function"]["arguments"]["a"], call["function"]["arguments"]["b"])
            for message in batch.conversations[row]
            for call in message.get("tool_calls", [])
        ]
        assert environment.calls == calls  # the row's calls went to the row's object
        assert environment.target == int(batch.columns["answer"][row])
    assert sum(len(e.calls) for e in environments) >= 3
    reward = tools.environment_reward(AddEnvironment)
    scores, _ = rewards.run_rewards(batch, [reward, rewards.exact_answer], ["env", "exact"])
    expected = [e.get_reward() for e in environments]
    assert np.array(scores[:, 0]).tolist() == expected
    first_calls = list(environments[0].calls)
    again = multiturn.generate(model, tokenizer, ROWS, cfg, turns, seed=4)
    assert again.environments[0] is environments[0]  # pooled: made once, reset each step
    assert again.environments[0].target == environments[0].target and first_calls


def test_rewards_get_conversations_prompts_as_messages_and_read_the_last_answer(tools_model):
    batch = _rollout(tools_model)
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, kwargs=kwargs)
        return [0.0] * len(prompts)

    scores, _ = rewards.run_rewards(batch, [spy, rewards.exact_answer], ["spy", "exact"])
    assert seen["completions"] == batch.conversations and seen["prompts"] == batch.prompt_messages
    lengths = np.array(batch.completion_mask).sum(axis=1).astype(int)
    assert [len(ids) for ids in seen["ids"]] == lengths.tolist()  # tool tokens included (TRL)
    answers = [c[-1]["content"] for c in batch.conversations]
    assert seen["kwargs"]["completion_answer"] == answers
    expected = [float(a == b) for a, b in zip(answers, batch.columns["answer"])]
    assert np.array(scores[:, 1]).tolist() == expected


def my_rollout(prompts, trainer):
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token_id
    completions = [tokenizer.encode("12") + [eos], tokenizer.encode("345")]
    return {
        "prompt_ids": [tokenizer.encode(p) for p in prompts],
        "completion_ids": [completions[i % 2] for i in range(len(prompts))],
        "logprobs": [[-0.5] * len(completions[i % 2]) for i in range(len(prompts))],
        "env_mask": [[1, 0, 1] if i % 2 == 0 else [1, 1, 1] for i in range(len(prompts))],
        "judge": [f"row{i}" for i in range(len(prompts))],
        "episode": 7,
    }


def test_rollout_func_builds_the_batch_from_its_output(tools_model):
    model, tokenizer = tools_model
    cfg = RolloutConfig(group_size=2, max_new_tokens=8, rollout_func="test_multiturn.my_rollout")
    turns = multiturn.setup(cfg, tokenizer)
    batch = multiturn.generate(model, tokenizer, ROWS[:2], cfg, turns, seed=1)
    assert batch.num_rows == 4 and batch.finish_reasons == ["stop", "length"] * 2
    assert batch.texts[:2] == ["12", "345"]
    assert np.array(batch.tool_mask)[0, :3].tolist() == [1, 0, 1]
    assert np.array(batch.generated_mask).sum(axis=1).tolist() == [2, 3, 2, 3]
    assert batch.columns["judge"] == ["row0", "row1", "row2", "row3"]
    assert batch.columns["episode"] == [7] * 4 and batch.columns["answer"][2] == ROWS[1]["answer"]

    def bad(prompts, trainer):
        return {"prompt_ids": [], "completion_ids": []}

    turns.rollout_func = bad
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        multiturn.generate(model, tokenizer, ROWS[:2], cfg, turns)


# -- the update counts only generated tokens ------------------------------------------------------


UPDATE_CASES = {
    "dapo-mu2": dict(loss_type="dapo", num_iterations=2),
    "grpo-spg2": dict(loss_type="grpo", steps_per_generation=2, num_iterations=2),
    "dr_grpo": dict(loss_type="dr_grpo", num_iterations=2),
    # the top fifth: most of the tools model's tokens (the call's syntax) have entropies near 0,
    # where float32 (ours) and float64 (the reference) break ties at a median differently
    "bnpo-micro4-entropy": dict(
        loss_type="bnpo", micro_batch_size=4, top_entropy_quantile=0.2, num_iterations=2
    ),
    "dapo-beta-truncated": dict(
        loss_type="dapo", beta=0.1, num_iterations=2, mask_truncated_completions=True
    ),
    "grpo-is-token": dict(
        loss_type="grpo",
        num_iterations=2,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="token_truncate",
    ),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_update_on_a_multi_turn_batch_matches_trl_over_the_final_transcript(tools_model, case):
    """update_step on multi-turn completions against TRL's optimizer loop rebuilt from the
    NumPy transcription (tests/test_grpo_update.py), whose forward is one plain forward per row
    over prompt + the whole transcript and whose loss mask is completion_mask * tool_mask."""
    from test_grpo_update import _trl_reference_update

    cfg = TrainConfig(max_grad_norm=0, **UPDATE_CASES[case])
    path = resolve_path("builtin:tiny_qwen3_tools")

    def fresh():
        model, tokenizer = load(path, dtype="float32")
        batch = _rollout((model, tokenizer), _with(group_size=4), rows=ROWS[:2], seed=6)
        if cfg.mask_truncated_completions:
            batch.finish_reasons[1] = batch.finish_reasons[6] = "length"
        rewards_ = mx.array(np.random.default_rng(1).random(batch.num_rows).astype(np.float32))
        return model, batch, compute_advantages(rewards_, 4, "group")

    reference = load(path, dtype="float32")[0] if cfg.beta else None
    model, batch, advantages = fresh()
    assert (np.array(batch.tool_mask)[np.array(batch.completion_mask) > 0] == 0).sum() > 100
    got = grpo_update.update_step(
        model, optim.SGD(learning_rate=1.0), batch, advantages, cfg, reference, seed=3
    )
    ours = dict(tree_flatten(model.parameters()))
    model, batch, advantages = fresh()
    want_params, want = _trl_reference_update(
        model, batch, advantages, cfg, ref_model=reference, seed=3
    )
    start = dict(tree_flatten(load(path, dtype="float32")[0].parameters()))
    for name, value in want_params.items():
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), atol=2e-5, err_msg=name)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    moved = max(np.abs(np.array(ours[k]) - np.array(v)).max() for k, v in start.items())
    assert moved > 1e-3


def test_tool_tokens_change_nothing_but_the_context(tools_model):
    """The same update with every tool token also counted as generated gives another gradient:
    the loss really ignores them (not a vacuous comparison)."""
    path = resolve_path("builtin:tiny_qwen3_tools")
    cfg = TrainConfig(max_grad_norm=0)
    grads = []
    for count_tool_tokens in (False, True):
        model, tokenizer = load(path, dtype="float32")
        batch = _rollout((model, tokenizer), _with(group_size=4), rows=ROWS[:2], seed=6)
        if count_tool_tokens:
            batch.tool_mask = None
        advantages = compute_advantages(mx.arange(8).astype(mx.float32), 4, "group")
        metrics = grpo_update.update_step(model, optim.SGD(1.0), batch, advantages, cfg, seed=3)
        grads.append(metrics["grad_norm"])
    assert abs(grads[0] - grads[1]) > 1e-3 * grads[0]
