"""Gradient (activation) checkpointing for the update step, on mlx-lm's `grad_checkpoint`.

mlx-lm's tuner replaces a block class's `__call__` with one wrapped in `mx.checkpoint`, so each
transformer block's activations are recomputed in the backward pass instead of kept: memory for
activations drops from one set per block to about one block's, for roughly one extra forward.
mlx-lm patches the class for good; `enabled(model)` patches it for the duration of the block
only, so rollouts (KV caches) run the plain layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.nn as nn
from mlx_lm.tuner.trainer import grad_checkpoint


@contextmanager
def enabled(model: nn.Module, on: bool | str = True) -> Iterator[nn.Module]:
    """Within the block, every transformer block of `model` is gradient-checkpointed; with
    `on="mlp"` only each block's MLP (or mixture of experts) is: its inner activations (gate,
    up and their product: about 40% of a Qwen3 block's stored values) are recomputed, the
    attention's are kept: about 60% of the recomputation of whole blocks (the MLP's share of a
    Qwen3 block's matmul work)."""
    if not on:
        yield model
        return
    first_of_type = {}
    for layer in model.layers:
        module = layer.mlp if on == "mlp" and hasattr(layer, "mlp") else layer
        first_of_type.setdefault(type(module), module)
    with wrapped_calls(first_of_type, lambda call: call):  # restores what mlx-lm patches
        for module in first_of_type.values():
            grad_checkpoint(module)
        yield model


@contextmanager
def wrapped_calls(classes, wrap) -> Iterator[None]:
    """Within the block, each class in `classes` has `__call__ = wrap(its own __call__)`;
    restored after (the update's patches of mlx-lm's module classes)."""
    originals = {cls: cls.__call__ for cls in set(classes)}
    try:
        for cls, call in originals.items():
            cls.__call__ = wrap(call)
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


# A block's MLP (or mixture of experts), by attribute name (`staged`), and an MLP's down
# projection.
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
DOWN_NAME = "down_proj"


@contextmanager
def staged(
    model: nn.Module, stages, split: bool = False, same=lambda x, tapped: tapped
) -> Iterator[nn.Module]:
    """Within the block, each transformer block's output is registered with `stages` (a
    stages.policy.StagedEval) as the graph is built, so the forward pass is evaluated one block
    at a time. On a GPU MLX allocates an operation's output when it encodes it, ahead of the
    compute; evaluating the whole forward at once would hold every block's temporaries (and,
    with checkpointing, defeat it). Each block's input is tapped (StagedEval.tap) for its
    gradient; with `split`, also its MLP's input (StagedEval.tap_middle) and its MLP's down
    projection's input (StagedEval.tap_down, where the MLP has a `down_proj`), so the backward
    of a block can be evaluated in parts (grpo_update.eval_by_block). `same(x, tapped)` is
    what the MLP and the down projection take instead of x (lean_activations.recorded_as: the
    tapped input stands in for the norm or swiglu output it is)."""
    mlps, downs = {}, {}  # id -> each block's MLP module and its down projection, with `split`
    for layer in model.layers if split else []:
        module = next((getattr(layer, n) for n in MLP_NAMES if hasattr(layer, n)), None)
        if isinstance(module, nn.Module):
            mlps[id(module)] = module
            down = getattr(module, DOWN_NAME, None)
            if isinstance(down, nn.Module):
                downs[id(down)] = down

    def wrap(call):
        def staged_call(self, x, *args, **kwargs):
            out = call(self, stages.tap(x), *args, **kwargs)
            stages.add(out)
            return out

        return staged_call

    def tapping(modules: dict, tap):
        """A call wrapper: the input of a module in `modules` goes through `tap` first."""

        def wrap_call(call):
            def tapped_call(self, x, *args, **kwargs):
                if id(self) in modules:
                    x = same(x, tap(x))
                return call(self, x, *args, **kwargs)

            return tapped_call

        return wrap_call

    with (
        wrapped_calls({type(layer) for layer in model.layers}, wrap),
        wrapped_calls({type(m) for m in mlps.values()}, tapping(mlps, stages.tap_middle)),
        wrapped_calls({type(m) for m in downs.values()}, tapping(downs, stages.tap_down)),
    ):
        yield model
