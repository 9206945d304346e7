"""Run by tests/test_distributed.py under `mlx.launch -n 2 --backend $GRPO_TEST_BACKEND` (ring or
mpi); prints JSON per rank."""

import json
import os
import sys

import stages  # noqa: F401
from stages import distributed

import mlx.core as mx

world = distributed.init(os.environ.get("GRPO_TEST_BACKEND", "ring"))
report = {"rank": world.rank, "size": world.size, "backend": os.environ.get("GRPO_TEST_BACKEND")}
report["shard"] = [distributed.shard(8, world).start, distributed.shard(8, world).stop]
gathered = distributed.all_gather(mx.array([float(world.rank)] * 2), world)
report["gathered"] = gathered.tolist()
report["sum"] = distributed.all_sum(mx.array(world.rank + 1.0), world).item()
report["metrics"] = distributed.reduce_metrics(
    {
        "reward": float(world.rank),
        "clip_ratio/low_min": float(world.rank),
        "clip_ratio/high_max": float(world.rank),
    },
    world,
)
try:
    distributed.check_same(sys.argv[1] if world.rank == 0 else sys.argv[2], world)
    report["config"] = "same"
except distributed.DistributedError as error:
    report["config"] = str(error)
try:
    distributed.shard(3, world)
except distributed.DistributedError as error:
    report["shard_error"] = str(error)
print("REPORT " + json.dumps(report), flush=True)
