"""Run by tests/test_distributed.py under `mlx.launch -n 2 --backend ring`.

Each rank samples its share of a global batch (global-row keys), takes its slice of the global
advantages and runs update_step with the world; it also runs the same update as one process on
the whole batch (no collectives) and reports, per case, the largest difference between the two
resulting weights and the two losses. TRL's bnpo is each process's token mean, averaged: one
process matches it with one micro-batch per rank's share. The top_entropy_quantile threshold
pools both ranks' micro-batch, so it matches one process with the whole batch.
"""

import json

import stages  # noqa: F401
from stages import distributed, grpo_update, rollout
from stages.advantages import group_advantages
from stages.load_weights import load
from stages.losses import LOSS_TYPES

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

world = distributed.init("ring")
PROMPTS = ["1+2=", "3+4=", "2+2=", "0+1="]
GROUP = 4
_, tokenizer = load("builtin:tiny_qwen3", dtype="float32")
prompts = [tokenizer.encode(p) for p in PROMPTS]
mine = distributed.shard(len(prompts), world)
settings = rollout.RolloutConfig(group_size=GROUP, max_new_tokens=4, temperature=1.5)


model = load("builtin:tiny_qwen3", dtype="float32")[0]
initial = model.parameters()  # MLX arrays are immutable: updates replace them


def fresh():
    model.update(initial)
    return model


whole = rollout.generate_rollouts(model, tokenizer, prompts, settings, seed=5)
local = rollout.generate_rollouts(
    model,
    tokenizer,
    prompts[mine],
    settings,
    seed=5,
    row_offset=mine.start * GROUP,
    total_rows=len(prompts) * GROUP,
)
report = {
    "rank": world.rank,
    "same_samples": whole.texts[mine.start * GROUP : mine.stop * GROUP] == local.texts,
}
scores = mx.array(np.random.default_rng(0).normal(size=(len(prompts) * GROUP, 1)), mx.float32)
advantages = group_advantages(scores, [1.0], GROUP, "batch")[0]
local_advantages = advantages[mine.start * GROUP : mine.stop * GROUP]

CASES = {name: dict(loss_type=name) for name in LOSS_TYPES}
CASES["dapo-entropy"] = dict(loss_type="dapo", top_entropy_quantile=0.3)
CASES["grpo-sampler-correction"] = dict(loss_type="grpo", vllm_importance_sampling_correction=True)
for case, settings in CASES.items():
    cfg = grpo_update.TrainConfig(max_grad_norm=0.5, **settings)
    one_process = cfg
    if cfg.loss_type == "bnpo":
        one_process = grpo_update.TrainConfig(
            max_grad_norm=0.5, micro_batch_size=local.num_rows, **settings
        )
    results = []
    for batch, adv, w, c in (
        (whole, advantages, None, one_process),
        (local, local_advantages, world, cfg),
    ):
        net = fresh()
        optimizer = grpo_update.make_optimizer(1e-2)
        if c.vllm_importance_sampling_correction:
            # the ratio carries the float noise of each rank's own old log-probs (1e-7), which
            # Adam's first step, lr * g / |g|, blows up on weights whose gradient is ~0: SGD
            # shows the gradient itself
            optimizer = optim.SGD(learning_rate=1e-1)
        metrics = grpo_update.update_step(net, optimizer, batch, adv, c, world=w)
        results.append((dict(tree_flatten(net.parameters())), metrics))
    (one, one_metrics), (par, par_metrics) = results
    start = dict(tree_flatten(initial))
    report[case] = {
        "weights": max(mx.abs(one[k] - par[k]).max().item() for k in one),
        "moved": max(mx.abs(one[k] - start[k]).max().item() for k in one),
        "loss": abs(one_metrics["loss"] - par_metrics["loss"]),
        "grad_norm": abs(one_metrics["grad_norm"] - par_metrics["grad_norm"]),
        "entropy": abs(one_metrics["entropy"] - par_metrics["entropy"]),
    }
print("REPORT " + json.dumps(report), flush=True)
