"""Where a rollout's time goes, per decode engine: the full rollout vs its parts, on the same
weights and work.

    python benchmarks/rollout_profile.py [--shape small|0.6b] [--engines fused,fused+fast,mlx_lm]
        [--fused-compile auto|on|off] [--runs 2] [--cuda-kernels]

For each engine (`stages.rollout.make_engine`: fused, mlx_lm, and fused+fast: the fused engine
with rollout.fast_kernels, CUDA only, in the default list there) it prints, side by side:
(1) `generate_rollouts` on that engine; (2) the bare decode floor: the engine's prefill and
cache, then one forward per step with a greedy argmax and nothing else; (3) the floor plus our
per-row sampler (`Sampler`, per-row keys, inverse-CDF draw); (4) the floor plus
`mx.random.categorical` on the whole batch (mlx-lm's draw). The decode loops run as the rollout
does: step t+1 is queued with `mx.async_eval` before the host reads step t's tokens. The gaps
between them are the sampler's cost and the host bookkeeping's cost. For each decode loop it
also prints the host's share: milliseconds per step spent building the step's graph in Python
(the engine's forward and the draw) and dispatching it (`mx.async_eval`, which on CUDA encodes
every kernel on the calling thread), and that share of the step. When build + dispatch is close
to the step time, the step is host-bound: the GPU waits for the host, and only fewer or cheaper
operations per step make it faster. (On CPU the share means little: MLX bounds the tasks in
flight, so dispatching waits for the compute. CPU ms/step, this process's CPU time, is the
steadier measure on a CPU shared with other work.)
"""

from __future__ import annotations

import time

import stages  # noqa: F401  (before mlx.core: fast CPU BLAS)

# isort: split
from stages import fast_kernels, fused_decode
from stages.backend import resolve_dtype
from stages.rollout import RolloutConfig, Sampler, generate_rollouts, make_engine

import mlx.core as mx
import numpy as np
from rollout import SHAPES, build_model, work_arguments  # benchmarks/rollout.py, beside this file


class _Tokenizer:
    eos_token_ids = {-1}
    pad_token_id = 0

    def decode(self, ids):
        return ""


def decode_loop(engine, prompts, group, steps, draw) -> tuple[float, float, float, float]:
    """(seconds in all, CPU seconds, seconds building graphs, seconds dispatching them) of one
    rollout's prefill and decode through `engine`, pipelined one step ahead as the rollout is."""
    tokens = mx.array(prompts, dtype=mx.int32)
    start, cpu_start = time.perf_counter(), time.process_time()
    logits = engine.prefill(tokens, [0] * len(prompts), steps)
    shared = mx.repeat(mx.arange(len(prompts)), group)
    engine.filter(shared)
    logits = logits[shared]
    keys = mx.random.split(mx.random.key(0), steps)
    token = draw(logits, keys[0])
    mx.async_eval(token)
    build = dispatch = 0.0
    for step in range(1, steps):
        tick = time.perf_counter()
        next_token = draw(engine.decode(token), keys[step])
        tock = time.perf_counter()
        mx.async_eval(next_token)
        build, dispatch = build + tock - tick, dispatch + time.perf_counter() - tock
        np.array(token)  # the host reads step t while step t + 1 runs
        token = next_token
    np.array(token)
    return time.perf_counter() - start, time.process_time() - cpu_start, build, dispatch


def main() -> None:
    parser = work_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--engines",
        default=None,
        help="comma-separated: fused, fused+fast (CUDA), mlx_lm; default: all this device runs",
    )
    parser.add_argument("--fused-compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per variant (best kept)")
    parser.add_argument(
        "--cuda-kernels",
        action="store_true",
        help="also, per engine, the GPU time of each kernel of a decode step (the decode floor "
        "under torch.profiler: CUDA's own records of MLX's kernels; needs torch)",
    )
    args = parser.parse_args()
    fused_decode.COMPILE = {"auto": None, "on": True, "off": False}[args.fused_compile]
    shape = args.shape or ("0.6b" if mx.default_device() != mx.cpu else "small")
    model = build_model(SHAPES[shape], resolve_dtype("auto"))
    vocab = model.args.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, args.prompt_tokens).tolist() for _ in range(args.prompts)]
    n_rows = args.prompts * args.group
    sampler = Sampler(RolloutConfig(group_size=args.group))

    def ours(logits, key):
        return sampler(logits, None, mx.random.split(key, n_rows))[0]

    def argmax(logits, key):
        return mx.argmax(logits, axis=-1)

    def categorical(logits, key):
        return mx.random.categorical(logits.astype(mx.float32), key=key)

    tokens = n_rows * args.new_tokens
    print(
        f"device {mx.default_device()}, shape {shape}, {args.prompts} prompts x group "
        f"{args.group}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
        f"fused compile {args.fused_compile}"
    )
    default = "fused,fused+fast,mlx_lm" if fast_kernels.unavailable() is None else "fused,mlx_lm"
    for engine_name in (args.engines or default).split(","):
        cfg = RolloutConfig(
            group_size=args.group,
            max_new_tokens=args.new_tokens,
            engine=engine_name.split("+")[0],
            fast_kernels=engine_name.endswith("+fast"),
        )

        def loop(draw, cfg=cfg):
            return decode_loop(make_engine(model, cfg), prompts, args.group, args.new_tokens, draw)

        systems = {
            "generate_rollouts": lambda cfg=cfg: _time_rollout(model, prompts, cfg),
            "decode floor (argmax)": lambda loop=loop: loop(argmax),
            "floor + our sampler": lambda loop=loop: loop(ours),
            "floor + mx.random.categorical": lambda loop=loop: loop(categorical),
        }
        if args.cuda_kernels:
            kernel_table(engine_name, lambda loop=loop: loop(argmax), args.new_tokens)
        for name, run in systems.items():
            run()  # warm-up
            timings = [run() for _ in range(args.runs)]
            seconds, _, build, dispatch = min(timings)
            cpu = min(t[1] for t in timings)
            step_ms = 1000 * seconds / args.new_tokens
            host = ""
            if build:
                build_ms = 1000 * build / args.new_tokens
                dispatch_ms = 1000 * dispatch / args.new_tokens
                share = (build_ms + dispatch_ms) / step_ms
                host = (
                    f"  host: build {build_ms:5.2f} + dispatch {dispatch_ms:5.2f} ms/step "
                    f"({100 * share:3.0f}%)"
                )
            print(
                f"{engine_name:10s} {name:30s} {seconds:7.3f} s  {tokens / seconds:9.0f} "
                f"tokens/s  {step_ms:6.2f} ms/step  CPU {1000 * cpu / args.new_tokens:6.2f} "
                f"ms/step{host}",
                flush=True,
            )


def kernel_table(engine_name: str, run, steps: int, rows: int = 14) -> None:
    """Print the GPU time per decode step of the kernels `run()` launches (one rollout's decode
    floor, after a warm-up), by kernel name, largest first; and the GPU's busy time per step.
    CUDA's records come through torch.profiler (CUPTI), which sees every kernel of the process;
    the prefill's kernels are in the sums too (a few percent of a 256-step rollout)."""
    from torch.profiler import ProfilerActivity, profile

    run()  # warm-up: traces and kernels built
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    times: dict[str, list[float]] = {}
    spans = []
    for event in prof.events():
        if event.device_type.name != "CUDA" or event.time_range.elapsed_us() <= 0:
            continue
        name = event.name if len(event.name) < 60 else event.name[:57] + "..."
        times.setdefault(name, []).append(event.time_range.elapsed_us())
        spans.append((event.time_range.start, event.time_range.end))
    spans.sort()
    busy, end = 0.0, float("-inf")  # the union of the kernels' spans (they may overlap)
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    total = sum(sum(t) for t in times.values())
    print(f"{engine_name}: GPU kernels of one decode floor, per step ({steps} steps):")
    print(f"  {'kernel':<62}{'calls':>7}{'us each':>9}{'us/step':>9}{'share':>7}")
    for name, t in sorted(times.items(), key=lambda item: -sum(item[1]))[:rows]:
        per_step = sum(t) / steps
        print(
            f"  {name:<62}{len(t) / steps:>7.1f}{sum(t) / len(t):>9.1f}{per_step:>9.1f}"
            f"{100 * sum(t) / total:>6.1f}%"
        )
    print(
        f"  all: {sum(len(t) for t in times.values()) / steps:.0f} kernels, "
        f"{total / steps / 1000:.2f} ms/step of kernel time, GPU busy {busy / steps / 1000:.2f} "
        "ms/step",
        flush=True,
    )


def _time_rollout(model, prompts, cfg) -> tuple[float, float, float, float]:
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = generate_rollouts(model, _Tokenizer(), prompts, cfg)
    assert batch.engine == cfg.engine, f"asked for engine={cfg.engine}, ran {batch.engine}"
    return time.perf_counter() - start, time.process_time() - cpu_start, 0.0, 0.0


if __name__ == "__main__":
    main()
