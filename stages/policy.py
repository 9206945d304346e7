"""The policy's training forward pass, shared by the rollout and the update.

A RolloutBatch is packed as [prompt | completion | pad] rows with positions from 0; one forward
pass gives the hidden states, and only the positions that predict completion tokens go through
the vocabulary head. The log-probs are log_softmax(logits / temperature) of each completion
token, as TRL computes them.

The vocabulary head is the memory problem of GRPO: a micro-batch's completion logits (rows x
positions x vocabulary, float32; 151,936 columns for Qwen3) and their gradient are larger than
the rest of the update together. `completion_logprobs` never holds them: it runs the head over
chunks of positions, keeps only each position's log-prob and entropy, and (under `mx.checkpoint`)
recomputes a chunk's logits in the backward pass instead of storing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from stages import logprob_kernels
from stages.entropy import token_entropy
from stages.grad_checkpoint import wrapped_calls

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# float32 logits of one block of vocabulary columns (all positions x block columns): 64 MiB
LOGITS_BUDGET = 1 << 24


def _attention_tile() -> int:
    """Sequence lengths the training forward is padded to a multiple of. MLX's CUDA backend runs
    attention's backward pass fused (cuDNN) only for a length that is a multiple of 128; any
    other length takes the unfused fallback, which stores every head's (L, L) scores per block
    (measured on an H200 for 16 x 511 tokens of Qwen3-0.6B: most of the update's memory)."""
    return 128 if mx.default_device() == mx.gpu and mx.cuda.is_available() else 1


def forward_inputs(tokens: mx.array, tile: int | None = None) -> mx.array:
    """The training forward's input of packed rows (N, W): every token but the last, right-
    padded to a multiple of `tile` (default: `_attention_tile()`). Positions past a row's end
    are never read by an earlier one (causal attention), so the padding changes no result."""
    inputs = tokens[:, :-1] if tokens.shape[1] > 1 else tokens
    tile = tile or _attention_tile()
    extra = -inputs.shape[1] % tile
    if extra == 0:
        return inputs
    if tokens.shape[1] > inputs.shape[1]:  # the last token is the cheapest padding
        inputs, extra = tokens, extra - 1
    return mx.pad(inputs, [(0, 0), (0, extra)]) if extra else inputs


@dataclass
class PackedBatch:
    """Prompt + completion per row, right-padded, for the training forward pass."""

    tokens: mx.array  # (N, L) int32
    gather_index: mx.array  # (N, T) int32: position whose logits predict completion token t
    completion_ids: mx.array  # (N, T) int32
    loss_mask: mx.array  # (N, T) float32: 1 on generated tokens (never on tool results)


def pack(batch) -> PackedBatch:
    """Pack a RolloutBatch as [prompt | completion | pad] rows with positions from 0.

    Right padding keeps every real token at its true position under a plain causal mask, so the
    training forward needs no attention mask and matches generation on the left-padded cache.
    The forward reads the whole completion (`completion_mask`: tool results too, as context);
    the loss mask is the batch's `generated_mask`, the model's own tokens only.
    """
    completion_ids = np.array(batch.completion_ids)
    lengths = np.array(batch.completion_mask).sum(axis=1).astype(np.int64)
    prompt_lengths = np.array([len(p) for p in batch.prompt_ids])
    width = int((prompt_lengths + lengths).max())
    n_rows, n_steps = completion_ids.shape
    tokens = np.zeros((n_rows, width), dtype=np.int32)
    for row, (prompt, n) in enumerate(zip(batch.prompt_ids, lengths)):
        tokens[row, : len(prompt)] = prompt
        tokens[row, len(prompt) : len(prompt) + n] = completion_ids[row, :n]
    gather = prompt_lengths[:, None] - 1 + np.arange(n_steps)[None, :]
    gather = np.minimum(gather, width - 1).astype(np.int32)
    return PackedBatch(
        mx.array(tokens), mx.array(gather), batch.completion_ids, batch.generated_mask
    )


def take_rows(packed: PackedBatch, rows) -> PackedBatch:
    """The packed rows `rows` (an index array or a slice)."""
    return PackedBatch(
        packed.tokens[rows],
        packed.gather_index[rows],
        packed.completion_ids[rows],
        packed.loss_mask[rows],
    )


def hidden_and_head(model: nn.Module):
    """(backbone, head) of an mlx-lm causal LM, so that only the positions that are needed go
    through the vocabulary head; (None, None) for a model without that structure."""
    backbone = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if backbone is None or args is None:
        return None, None
    if getattr(args, "tie_word_embeddings", False):
        return backbone, backbone.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (backbone, head) if head is not None else (None, None)


def completion_logits(model: nn.Module, packed: PackedBatch, temperature: float = 1.0) -> mx.array:
    """Logits that predict each completion token: (N, T, V) float32, divided by temperature."""
    inputs = forward_inputs(packed.tokens)
    index = mx.minimum(packed.gather_index, max(packed.tokens.shape[1] - 2, 0))
    backbone, head = hidden_and_head(model)
    if backbone is not None:
        hidden = backbone(inputs)
        picked = mx.take_along_axis(hidden, index[..., None], axis=1)
        logits = head(picked)
    else:
        logits = mx.take_along_axis(model(inputs), index[..., None], axis=1)
    return logits.astype(mx.float32) / temperature


def token_logprobs(logits: mx.array, token_ids: mx.array) -> mx.array:
    """log softmax(logits)[token]. (N, T, V), (N, T) -> (N, T)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logprobs, token_ids[..., None], axis=-1)[..., 0]


class StagedEval:
    """Parts of a lazily built graph to evaluate one at a time, in order, before the rest.

    MLX schedules a graph breadth first and allocates ahead of the compute, so the independent
    blocks of the vocabulary head would all hold their logits at once. While the loss and its
    gradient are built, the head registers each block's results here; `run()` evaluates them
    block by block (each evaluation frees its block's logits), and then the caller evaluates the
    gradients as usual.
    """

    # At most this many parts in flight: 2 lets a GPU compute one part while the host builds the
    # next; 1 (plan_micro_batch's probes, updates with gradient checkpointing, every update on
    # the CPU) makes peak memory lower and the same from run to run (with 2 it moves with the
    # host's timing).
    in_flight = 2

    @staticmethod
    @contextmanager
    def parts_in_flight(parts: int) -> Iterator[None]:
        """Within the block, at most `parts` parts are in flight (StagedEval.in_flight)."""
        saved = StagedEval.in_flight
        StagedEval.in_flight = parts
        try:
            yield
        finally:
            StagedEval.in_flight = saved

    def __init__(self) -> None:
        self._pending: list = []
        # Each transformer block's input gradient, by block (tap): see input_grads; its MLP
        # input's (tap_middle) and its MLP's down projection input's (tap_down).
        self.input_grads: dict[int, mx.array] = {}
        self.middle_grads: dict[int, mx.array] = {}
        self.down_grads: dict[int, mx.array] = {}
        self._taps = 0

    def tap(self, x: mx.array) -> mx.array:
        """x (the input of the next transformer block) unchanged; its gradient, once the
        backward pass is built, lands in `input_grads[i]` (i: the block's order). Evaluating it
        with block i's parameter gradients (grpo_update.eval_by_block) frees block i's kept or
        recomputed activations then, not at the next block's evaluation."""
        index = self._taps
        self._taps += 1
        return self._tapped(x, self.input_grads, index)

    def tap_middle(self, x: mx.array) -> mx.array:
        """x (the input of the last tapped block's MLP) unchanged; its gradient lands in
        `middle_grads[i]`: evaluated with the MLP's parameter gradients, it ends the MLP's
        backward (its activations and temporaries are freed) before the attention's starts."""
        return self._tapped(x, self.middle_grads, self._taps - 1)

    def tap_down(self, x: mx.array) -> mx.array:
        """x (the input of the last tapped block's MLP down projection) unchanged; its
        gradient lands in `down_grads[i]`: evaluated with the down projection's parameter
        gradients, it ends that projection's backward (the input it kept is freed) before the
        rest of the MLP's starts (the swiglu's backward, whose temporaries are the MLP's
        largest)."""
        return self._tapped(x, self.down_grads, self._taps - 1)

    @staticmethod
    def _tapped(x: mx.array, grads: dict[int, mx.array], index: int) -> mx.array:
        @mx.custom_function
        def identity(value):
            return value

        @identity.vjp
        def identity_back(primals, cotangent, output):
            grads[index] = cotangent
            return cotangent

        return identity(x)

    def add(self, *arrays: mx.array, serial: bool = False) -> None:
        """Queue one part. Its last array is the one waited on. `serial`: the part updates an
        array of the previous part in place (the head's weight gradient, built block by block
        with slice updates), so it is evaluated alone, between two waits for the whole stream:
        while an evaluation is in flight MLX holds its arrays, and an array still held is
        copied instead of written over. Waiting for the array alone is not enough on a GPU:
        MLX's CUDA backend lets go of a finished evaluation's arrays a moment after they are
        ready, and in that moment the update copied the (vocabulary, hidden) matrix: +0.31 GB,
        in 3 of 15 grpo_step steps of the 0.6B shape on an H200 (none of 15 with the waits)."""
        self._pending.append((arrays, serial))

    def run(self) -> None:
        """Evaluate the parts in order with at most two in flight (the next one is queued while
        the previous one finishes, so a GPU does not wait for the host between them)."""
        previous = None
        while self._pending:
            part, serial = self._pending.pop(0)  # popped first: its arrays die after their eval
            if StagedEval.in_flight < 2 or serial:
                if previous is not None:
                    mx.eval(previous)
                    previous = None
                if serial:
                    mx.synchronize()
                    mx.eval(part)
                    mx.synchronize()
                else:
                    mx.eval(part)
                continue
            mx.async_eval(part)
            if previous is not None:
                mx.eval(previous)
            previous = part[-1]  # one evaluation's outputs are ready together
        if previous is not None:
            mx.eval(previous)


class _Head:
    """The vocabulary head as a (V, D) matrix cut into row blocks: an Embedding used as a linear
    layer (tied embeddings) or a Linear without bias, plain or quantized."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.quantized = "scales" in module
        names = ("weight", "scales", "biases") if self.quantized else ("weight",)
        self.names = [n for n in names if n in module]
        # A frozen head (LoRA, QLoRA) needs no weight gradient.
        self.trainable = bool(module.trainable_parameters()) and not self.quantized

    @staticmethod
    def of(model: nn.Module) -> _Head | None:
        """The head of an mlx-lm causal LM, or None when it is not a plain (V, D) matrix."""
        backbone = getattr(model, "model", None)
        args = getattr(model, "args", None)
        if backbone is None or args is None:
            return None
        tied = getattr(args, "tie_word_embeddings", False)
        module = backbone.embed_tokens if tied else getattr(model, "lm_head", None)
        if module is None or "bias" in module or "weight" not in module:
            return None
        return _Head(module)

    def arrays(self) -> list[mx.array]:
        return [self.module[n] for n in self.names]

    @property
    def vocab(self) -> int:
        return self.module["weight"].shape[0]

    def logits(self, arrays: list, hidden: mx.array, start: int, stop: int) -> mx.array:
        """hidden (R, D) @ rows start:stop of the head, transposed -> (R, stop - start)."""
        if not self.quantized:
            return hidden @ arrays[0][start:stop].T
        return self._quantized_matmul(hidden, arrays, start, stop, transpose=True)

    def back(self, arrays: list, grad: mx.array, start: int, stop: int) -> mx.array:
        """grad (R, stop - start) @ rows start:stop of the head -> (R, D)."""
        if not self.quantized:
            return grad @ arrays[0][start:stop]
        return self._quantized_matmul(grad, arrays, start, stop, transpose=False)

    def _quantized_matmul(self, x, arrays, start, stop, transpose):
        named = dict(zip(self.names, arrays))
        biases = named.get("biases")
        m = self.module
        return mx.quantized_matmul(
            x,
            named["weight"][start:stop],
            scales=named["scales"][start:stop],
            biases=None if biases is None else biases[start:stop],
            transpose=transpose,
            group_size=m.group_size,
            bits=m.bits,
            mode=m.mode,
        )


class TiedInputGradient:
    """The input embedding's gradient added into the vocabulary head's, in place.

    With tied embeddings one (V, D) matrix is both the input lookup and the head. Left to
    autograd, the lookup's gradient is a scatter into a new zero (V, D) array, summed with the
    head's into a third: two extra matrices at the peak (1.2 GB for Qwen3-0.6B in float32).
    Within `recording()` the lookup's weight gradient is a broadcast zero (nothing is
    allocated; the sum reuses the head gradient's buffer) and its cotangent rows are kept;
    `fold(grads)` then scatter-adds them into the weight's gradient, which is written over.
    A model whose head is not a trainable tied matrix is left alone."""

    def __init__(self, model: nn.Module):
        backbone = getattr(model, "model", None)
        head = _Head.of(model)
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
        embed = getattr(backbone, "embed_tokens", None)
        self.active = bool(tied and head is not None and head.trainable and head.module is embed)
        self.embed = embed
        self.recorded: list[tuple[mx.array, mx.array]] = []

    @contextmanager
    def recording(self) -> Iterator[TiedInputGradient]:
        """Within the block, the embedding's lookups are recorded (see the class)."""
        if not self.active:
            yield self
            return
        embed, recorded = self.embed, self.recorded

        @mx.custom_function
        def lookup(weight, ids):
            return weight[ids]

        @lookup.vjp
        def lookup_back(primals, cotangent, output):
            weight, ids = primals
            recorded.append((ids, cotangent))
            zero = mx.broadcast_to(mx.array(0, dtype=cotangent.dtype), weight.shape)
            return zero, mx.zeros_like(ids)

        def wrap(call):
            def recorded_call(module, x):
                return lookup(module.weight, x) if module is embed else call(module, x)

            return recorded_call

        with wrapped_calls({type(embed)}, wrap):
            yield self

    def fold(self, grads: dict) -> dict:
        """`grads` (a gradient tree of the model) with the recorded rows added into the
        embedding weight's gradient; the record is cleared."""
        if not self.recorded:
            return grads
        node = grads["model"]["embed_tokens"]
        weight = node["weight"]
        for ids, rows in self.recorded:
            weight = weight.at[ids.reshape(-1)].add(rows.reshape(-1, rows.shape[-1]))
        node["weight"] = weight
        self.recorded.clear()
        return grads


def _combine(stats: list[mx.array]) -> tuple[mx.array, mx.array, mx.array]:
    """(log-probs, entropies, log-normalisers), each (R,), from the blocks' stats."""
    stats = mx.stack(stats)  # (blocks, 4, R)
    top = stats[:, 0].max(axis=0)
    scale = mx.exp(stats[:, 0] - top)
    total = (stats[:, 1] * scale).sum(axis=0)
    weighted = (stats[:, 2] * scale).sum(axis=0)
    normaliser = top + mx.log(total)
    return stats[:, 3].sum(axis=0) - normaliser, normaliser - weighted / total, normaliser


def _head_logprobs(head: _Head, temperature: float, block: int, stages: StagedEval | None):
    """f(hidden (R, D), ids (R,), *head arrays) -> (log-probs, entropies, log-normalisers),
    each (R,) float32, computed over blocks of `block` vocabulary rows. With `stages` the
    function carries a gradient (custom vjp: each block's logits recomputed, never stored) and
    registers its blocks there; without, it evaluates block by block and has no gradient."""
    tau = mx.array(temperature, dtype=mx.float32)
    spans = [(start, min(start + block, head.vocab)) for start in range(0, head.vocab, block)]

    def forward(hidden, ids, *arrays):
        stats = []
        for start, stop in spans:
            stats.append(
                logprob_kernels.block_stats(
                    head.logits(arrays, hidden, start, stop), tau, ids - start
                )
            )
            if stages is None:
                mx.eval(stats[-1])
            else:
                stages.add(stats[-1])
        return _combine(stats)

    if stages is None:
        return forward

    run = mx.custom_function(forward)

    @run.vjp
    def backward(primals, cotangents, outputs):
        hidden, ids, *arrays = primals
        grad, normaliser = cotangents[0], mx.stop_gradient(outputs[2])
        d_hidden = None
        d_weight = mx.zeros_like(arrays[0]) if head.trainable else None
        for start, stop in spans:
            logits = head.logits(arrays, hidden, start, stop)
            d_logits = logprob_kernels.block_grad(logits, tau, ids - start, normaliser, grad)
            part = head.back(arrays, d_logits, start, stop)
            d_hidden = part if d_hidden is None else d_hidden + part
            if d_weight is not None:
                # In place: a (static) slice update of an array nothing else holds once the
                # previous part is evaluated; the part gets this version of it (a new node),
                # since setting a slice rebinds `d_weight` itself. (Not `mx.slice_update`: its
                # CUDA kernel runs a thread per element of the whole (V, D) matrix, 0.56 ms a
                # block on an H200.)
                d_weight[start:stop] = (d_logits.T @ hidden).astype(d_weight.dtype)
                stages.add(mx.stop_gradient(d_weight), d_hidden, serial=True)
            else:
                stages.add(d_hidden)
        frozen = [mx.zeros_like(a) for a in arrays]  # never evaluated: nothing asks for them
        if d_weight is not None:
            frozen[0] = d_weight
        return (d_hidden.astype(hidden.dtype), mx.zeros_like(ids), *frozen)

    return run


def completion_logprobs(
    model: nn.Module,
    packed: PackedBatch,
    temperature: float = 1.0,
    *,
    entropies: bool = True,
    stages: StagedEval | None = None,
    block: int | None = None,
) -> tuple[mx.array, mx.array | None]:
    """(log-probs, entropies) of each completion token under the policy, both (N, T) float32:
    log_softmax(logits / temperature)[token] and the entropy (nats) of softmax(logits /
    temperature), as `token_logprobs` and `stages.entropy.token_entropy` compute them from
    `completion_logits` (equal within float32 rounding).

    The vocabulary head runs over blocks of `block` rows (default: LOGITS_BUDGET logits per
    block), keeping three numbers per position, so the (N, T, V) logits never exist.
    With `stages` (a gradient is taken) the log-probs carry a gradient, whose backward pass
    recomputes each block's logits; the caller calls `stages.run()` before evaluating the
    gradients. Without `stages` the results carry no gradient and are evaluated block by block.
    Entropies never carry a gradient. Models whose head is not a plain or quantized (V, D)
    matrix take the unchunked path.
    """
    head = _Head.of(model)
    if head is None:
        logits = completion_logits(model, packed, temperature)
        if stages is None:
            logits = mx.stop_gradient(logits)
        logprobs = token_logprobs(logits, packed.completion_ids)
        return logprobs, token_entropy(mx.stop_gradient(logits)) if entropies else None
    inputs = forward_inputs(packed.tokens)
    index = mx.minimum(packed.gather_index, max(packed.tokens.shape[1] - 2, 0))
    hidden = mx.take_along_axis(model.model(inputs), index[..., None], axis=1)
    n_rows, n_steps, width = hidden.shape
    rows = n_rows * n_steps
    block = block or max(1, LOGITS_BUDGET // max(rows, 1))
    run = _head_logprobs(head, temperature, block, stages)
    logprobs, entropy, _ = run(
        hidden.reshape(rows, width), packed.completion_ids.reshape(rows), *head.arrays()
    )
    entropy = mx.stop_gradient(entropy).reshape(n_rows, n_steps) if entropies else None
    return logprobs.reshape(n_rows, n_steps), entropy


def policy_logprobs(model: nn.Module, batch, temperature: float) -> mx.array:
    """(N, T) log p of each completion token of a RolloutBatch under the training forward pass,
    log_softmax(logits / temperature) with no processors or filters (TRL); 0 on padding and
    on tool-result tokens."""
    packed = pack(batch)
    logprobs, _ = completion_logprobs(model, packed, temperature, entropies=False)
    return logprobs * packed.loss_mask
