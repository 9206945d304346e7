"""The memory-lean head: completion log-probs and entropies computed over blocks of the
vocabulary, never the whole (N, T, V) logits, equal to the unchunked computation (float32):
values, the loss and the gradients of the update, for every loss type and with the
high-entropy mask."""

import contextlib

from stages import grpo_update, policy
from stages.advantages import compute_advantages
from stages.entropy import token_entropy
from stages.grpo_update import TrainConfig
from stages.losses import LOSS_TYPES
from stages.rollout import RolloutConfig, generate_rollouts

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

# Float32 throughout; on CUDA MLX's float32 matmuls run on TF32 tensor cores (10 mantissa bits),
# and the blocked and unchunked heads multiply in different shapes: 1e-5 holds on the CPU and
# Metal, not there.
REL = 1e-2 if mx.cuda.is_available() else 1e-5


def _relative(got, want) -> float:
    """max |got - want| / max |want|, over the whole tensor."""
    want = np.asarray(want, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / np.abs(want).max())


def _batch(tiny, seed=0, temperature=1.3):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ["1+2=", "3+4=", "12+2=", "0+1="]]
    cfg = RolloutConfig(group_size=4, max_new_tokens=5, temperature=temperature)
    return generate_rollouts(model, tokenizer, prompts, cfg, seed=seed)


def _unchunked(model, packed, temperature, entropies=True, stages=None):
    """The reference: the whole micro-batch's logits, then log-softmax and entropy."""
    logits = policy.completion_logits(model, packed, temperature)
    logprobs = policy.token_logprobs(logits, packed.completion_ids)
    return logprobs, token_entropy(mx.stop_gradient(logits)) if entropies else None


@pytest.mark.parametrize("block", [None, 1, 7, 64])
def test_blocked_logprobs_and_entropies_equal_the_unchunked_ones(tiny, block):
    model, _ = tiny
    packed = policy.pack(_batch(tiny))
    want_lp, want_entropy = _unchunked(model, packed, 1.3)
    got_lp, got_entropy = policy.completion_logprobs(model, packed, 1.3, block=block)
    assert got_lp.shape == want_lp.shape == packed.completion_ids.shape
    assert _relative(got_lp, want_lp) < REL
    assert _relative(got_entropy, want_entropy) < REL


@pytest.mark.parametrize("block", [None, 5])
def test_blocked_gradient_equals_the_unchunked_one(tiny, block):
    model, _ = tiny
    packed = policy.pack(_batch(tiny, seed=1))
    weights = mx.random.normal(packed.completion_ids.shape, key=mx.random.key(3))

    def reference(net):
        return (_unchunked(net, packed, 1.3)[0] * weights).sum()

    def blocked(net, stages):
        logprobs = policy.completion_logprobs(net, packed, 1.3, stages=stages, block=block)[0]
        return (logprobs * weights).sum()

    want_value, want = nn.value_and_grad(model, reference)(model)
    stages = policy.StagedEval()
    got_value, got = nn.value_and_grad(model, blocked)(model, stages)
    stages.run()
    mx.eval(got_value, got)
    assert abs(got_value.item() - want_value.item()) <= REL * abs(want_value.item())
    want, got = dict(tree_flatten(want)), dict(tree_flatten(got))
    assert set(got) == set(want)
    for name in want:  # the tied embedding gets both its input and its head gradient
        assert _relative(got[name], want[name]) < REL, name


class _Recording(optim.SGD):
    """SGD that keeps the gradients it is given (the update's accumulated gradient)."""

    def apply_gradients(self, gradients, parameters):
        self.gradients = dict(tree_flatten(gradients))
        return super().apply_gradients(gradients, parameters)


def _update(tiny_path, cfg, monkeypatch, logprobs_fn):
    from stages.load_weights import load

    monkeypatch.setattr(grpo_update, "completion_logprobs", logprobs_fn)
    model, tokenizer = load(tiny_path, dtype="float32")
    batch = _batch((model, tokenizer), seed=2)
    batch.finish_reasons[3] = "length"
    rewards = mx.array(np.random.default_rng(2).random(batch.num_rows).astype(np.float32))
    advantages = compute_advantages(rewards, 4, "group")
    optimizer = _Recording(learning_rate=1.0)
    metrics = grpo_update.update_step(model, optimizer, batch, advantages, cfg)
    return optimizer.gradients, metrics


@pytest.mark.parametrize("quantile", [1.0, 0.5])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_update_with_the_blocked_head_equals_the_unchunked_update(
    tiny_path, monkeypatch, loss_type, quantile
):
    """The whole update step (micro-batches of 3 rows accumulated into one optimizer step):
    the same loss, metrics and gradient as with the unchunked head."""
    cfg = TrainConfig(
        loss_type=loss_type,
        top_entropy_quantile=quantile,
        micro_batch_size=3,
        max_grad_norm=0,
        mask_truncated_completions=True,
    )
    real = policy.completion_logprobs
    want_grads, want = _update(tiny_path, cfg, monkeypatch, _unchunked)
    blocked = lambda *a, **k: real(*a, block=7, **k)  # noqa: E731  (several blocks of 64)
    got_grads, got = _update(tiny_path, cfg, monkeypatch, blocked)
    # cispo and vespo losses are sums of advantage x log-prob whose terms cancel (advantages
    # are zero-mean per group): their float32 rounding is absolute, of the size of the terms.
    assert got["loss"] == pytest.approx(want["loss"], rel=REL, abs=1e-6)
    assert got["entropy"] == pytest.approx(want["entropy"], rel=REL)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=REL)
    assert max(float(np.abs(np.array(v)).max()) for v in want_grads.values()) > 1e-4
    for name, value in want_grads.items():
        assert _relative(got_grads[name], value) < REL, name


@pytest.mark.parametrize("tile", [8, 128])
def test_padding_the_forward_to_the_attention_tile_changes_nothing(tiny, tile, monkeypatch):
    """On CUDA the training forward is right-padded to a multiple of 128 positions (attention's
    fused backward); the padding is after every real position, so log-probs, entropies and
    gradients equal the unpadded forward's."""
    model, _ = tiny
    packed = policy.pack(_batch(tiny, seed=2))
    width = packed.tokens.shape[1]
    assert (width - 1) % tile  # the padding is really added
    padded = policy.forward_inputs(packed.tokens, tile)
    assert padded.shape[1] % tile == 0 and padded.shape[1] >= width - 1
    assert mx.array_equal(padded[:, : width - 1], packed.tokens[:, :-1])
    weights = mx.random.normal(packed.completion_ids.shape, key=mx.random.key(5))

    def loss(net, stages):
        logprobs, entropies = policy.completion_logprobs(net, packed, 1.3, stages=stages)
        return (logprobs * weights).sum(), entropies

    results = {}
    for name, value in [("plain", 1), ("padded", tile)]:
        monkeypatch.setattr(policy, "_attention_tile", lambda value=value: value)
        stages = policy.StagedEval()
        (value, entropies), grads = nn.value_and_grad(model, loss)(model, stages)
        stages.run()
        mx.eval(value, entropies, grads)
        results[name] = (value.item(), entropies, dict(tree_flatten(grads)))
    (want, want_entropy, want_grads), (got, got_entropy, got_grads) = results.values()
    assert abs(got - want) <= REL * abs(want)
    assert _relative(got_entropy, want_entropy) < REL
    for name in want_grads:
        assert _relative(got_grads[name], want_grads[name]) < REL, name


def test_the_tied_embedding_gradient_is_autograds_sum(tiny_path, monkeypatch):
    """update_step adds the input lookup's gradient into the tied head's (TiedInputGradient):
    the same accumulated gradient as autograd's own sum of the two."""
    cfg = TrainConfig(micro_batch_size=3, max_grad_norm=0)
    folded = []
    fold = policy.TiedInputGradient.fold

    def counting_fold(self, grads):
        folded.append(len(self.recorded))
        return fold(self, grads)

    monkeypatch.setattr(policy.TiedInputGradient, "fold", counting_fold)
    got, _ = _update(tiny_path, cfg, monkeypatch, policy.completion_logprobs)
    assert folded and all(n == 1 for n in folded)  # one lookup per micro-batch, all folded
    # Nothing recorded: autograd sums the two gradients itself.
    monkeypatch.setattr(policy.TiedInputGradient, "recording", contextlib.nullcontext)
    want, _ = _update(tiny_path, cfg, monkeypatch, policy.completion_logprobs)
    assert set(got) == set(want)
    for name, value in want.items():
        assert _relative(got[name], value) < 1e-6, name


def test_the_tied_embedding_gradient_needs_no_extra_matrix():
    """With tied embeddings autograd would scatter the lookup's gradient into a new (V, D)
    matrix and add it to the head's in a third; folded in, the gradient's evaluation holds no
    vocabulary-sized matrix beyond the gradient itself."""
    from stages.tiny_model import TINY_QWEN3

    from mlx_lm.models import qwen3

    model = qwen3.Model(qwen3.ModelArgs.from_dict({**TINY_QWEN3, "vocab_size": 16384}))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    matrix = model.model.embed_tokens.weight.nbytes  # 4 MiB
    tokens = mx.random.randint(0, 16384, (2, 24), key=mx.random.key(0))
    packed = policy.PackedBatch(
        tokens=tokens,
        gather_index=mx.broadcast_to(mx.arange(7, 23)[None], (2, 16)),
        completion_ids=tokens[:, 8:24],
        loss_mask=mx.ones((2, 16)),
    )

    def loss(net, stages):
        return policy.completion_logprobs(net, packed, 1.0, stages=stages)[0].sum()

    peaks = {}
    for fold in (False, True):
        tied = policy.TiedInputGradient(model)
        assert tied.active
        stages = policy.StagedEval()
        with tied.recording() if fold else contextlib.nullcontext():
            _, grads = nn.value_and_grad(model, loss)(model, stages)
        grads = tied.fold(grads)
        stages.run()
        head = grads["model"]["embed_tokens"]["weight"]
        blocks = [v for k, v in tree_flatten(grads) if "embed_tokens" not in k]
        mx.eval(blocks)
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(head)
        peaks[fold] = mx.get_peak_memory() - before
        del grads, head, blocks
    # Unfolded, about one more matrix (4,170,260 bytes, 99.4% of it, measured once in the suite
    # on the CPU: part of it can be evaluated with the blocks); folded, under half of one.
    assert peaks[True] < matrix // 2 < 0.9 * matrix <= peaks[False]


def test_a_serial_part_is_evaluated_between_two_waits_for_the_stream(monkeypatch):
    """A serial part (one that updates the previous part's array in place) is evaluated after
    the previous part and between two waits for the whole stream (mx.synchronize): on a GPU an
    array MLX has not let go of yet is copied instead of updated in place."""
    calls = []
    for name in ("eval", "async_eval", "synchronize"):
        real = getattr(mx, name)
        monkeypatch.setattr(
            mx, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    stages = policy.StagedEval()
    built = mx.zeros((4, 3))
    stages.add(mx.ones(3) * 2)
    stages.add(mx.ones(3) * 3)
    stages.add(built.at[1].add(mx.ones(3)), serial=True)
    stages.add(mx.ones(3) * 4)
    stages.run()
    monkeypatch.undo()
    # Two parts in flight, then the previous one waited for, then the serial part alone.
    assert calls == [
        "async_eval",
        "async_eval",
        "eval",
        "eval",
        "synchronize",
        "eval",
        "synchronize",
        "async_eval",
        "eval",
    ]


def test_each_block_input_gradient_is_tapped_and_evaluated_with_its_block(tiny):
    """In the update's staged forward every block's input is tapped: its gradient (the
    cotangent the block below receives) is kept per block, and eval_by_block evaluates it with
    that block's parameter gradients and lets it go."""
    from stages import grad_checkpoint

    model, _ = tiny
    packed = policy.pack(_batch(tiny))
    stages = policy.StagedEval()
    tied = policy.TiedInputGradient(model)

    def loss(net):
        return policy.completion_logprobs(net, packed, 1.3, stages=stages)[0].sum()

    with grad_checkpoint.staged(model, stages), tied.recording():
        _, grads = nn.value_and_grad(model, loss)(model)
    assert sorted(stages.input_grads) == list(range(len(model.layers)))
    first = stages.input_grads[0]
    assert first.shape == (*policy.forward_inputs(packed.tokens).shape, model.args.hidden_size)
    stages.run()
    grpo_update.eval_by_block(grads, reverse=True, alongside=stages.input_grads)
    assert stages.input_grads == {}
    # block 0's input is the embedding's output: the same gradient reaches the lookup
    assert mx.array_equal(first, tied.recorded[0][1]).item()
    assert float(mx.abs(first).max()) > 0


def test_each_block_backward_is_evaluated_in_three_parts_down_projection_first(tiny, monkeypatch):
    """Each block's MLP input and its down projection's input are tapped too
    (StagedEval.middle_grads, down_grads): eval_by_block evaluates a block's down projection
    gradients with its input's gradient, then the rest of the MLP's with the MLP input's
    gradient, then the rest of the block with its input's gradient, last block first; the
    gradients are those of one evaluation."""
    from stages import grad_checkpoint

    model, _ = tiny
    packed = policy.pack(_batch(tiny))
    blocks = len(model.layers)

    def gradients(split: bool):
        stages = policy.StagedEval()
        tied = policy.TiedInputGradient(model)

        def loss(net):
            return policy.completion_logprobs(net, packed, 1.3, stages=stages)[0].sum()

        with grad_checkpoint.staged(model, stages, split), tied.recording():
            _, grads = nn.value_and_grad(model, loss)(model)
        return tied.fold(grads), stages

    grads, stages = gradients(split=True)
    assert sorted(stages.middle_grads) == sorted(stages.down_grads) == list(range(blocks))
    middle, inputs = dict(stages.middle_grads), dict(stages.input_grads)
    down = dict(stages.down_grads)
    assert middle[0].shape == inputs[0].shape  # (rows, positions, hidden)
    assert down[0].shape[-1] == model.layers[0].mlp.down_proj.weight.shape[1]  # intermediate
    named = {id(v): k for k, v in tree_flatten(grads)}
    named.update({id(v): f"middle {i}" for i, v in middle.items()})
    named.update({id(v): f"down {i}" for i, v in down.items()})
    named.update({id(v): f"input {i}" for i, v in inputs.items()})
    groups = []
    for name in ("eval", "async_eval"):
        real = getattr(mx, name)
        monkeypatch.setattr(
            mx,
            name,
            lambda *a, real=real: groups.append(a) or real(*a),  # noqa: B023
        )
    stages.run()
    groups.clear()
    grpo_update.eval_by_block(
        grads,
        reverse=True,
        alongside=stages.input_grads,
        middle=stages.middle_grads,
        down=stages.down_grads,
    )
    monkeypatch.undo()
    assert stages.middle_grads == {} and stages.input_grads == {} and stages.down_grads == {}
    parts = []  # each evaluated group once, in the order first asked for
    for call in groups:
        for group in call:
            part = sorted(named[id(a)] for a in group if id(a) in named)
            if isinstance(group, list) and part and part not in parts:
                parts.append(part)
    expected = []
    for i in reversed(range(blocks)):
        block = [k for k in named.values() if k.startswith(f"model.layers.{i}.")]
        in_down = [k for k in block if k.startswith(f"model.layers.{i}.mlp.down_proj.")]
        mlp = [k for k in block if k.startswith(f"model.layers.{i}.mlp.") and k not in in_down]
        rest = [k for k in block if k not in in_down and k not in mlp]
        assert in_down and mlp and rest
        expected += [
            sorted([*in_down, f"down {i}"]),
            sorted([*mlp, f"middle {i}"]),
            sorted([*rest, f"input {i}"]),
        ]
    assert parts[: 3 * blocks] == expected
    whole, _ = gradients(split=False)
    mx.eval(whole)
    for name, value in tree_flatten(whole):
        got, want = np.array(dict(tree_flatten(grads))[name]), np.array(value)
        if mx.cuda.is_available():  # the taps change which elementwise kernels MLX fuses there,
            # so float32 sums round apart (1.7e-6 relative at most on an H200); bit-equal on CPU
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)
