"""mx.distributed helpers with 2 real processes over the ring and MPI backends (CPU)."""

import resource
import subprocess
import sys
from pathlib import Path

from stages import distributed

import pytest
from launching import launch_env, reports

HERE = Path(__file__).resolve().parent


def test_single_process_is_a_no_op():
    world = distributed.init()
    assert world.size == 1 and world.is_main
    assert distributed.shard(8, world) == slice(0, 8)
    assert distributed.reduce_metrics({"reward": 0.5}, world) == {"reward": 0.5}
    distributed.check_same("anything", world)


def test_peer_failures_are_told_apart_from_other_errors():
    assert distributed.is_peer_failure(RuntimeError("[ring] connection to a peer was lost"))
    assert distributed.is_peer_failure(RuntimeError("NCCL error: remote process exited"))
    assert not distributed.is_peer_failure(RuntimeError("[matmul] shapes do not match"))
    assert not distributed.is_peer_failure(ValueError("[ring] looks alike, other type"))


def _launch(script: str, *args: str, backend: str = "ring") -> list[dict]:
    launcher = [sys.executable, "-m", "pipelines.launch", "-n", "2", "--backend", backend]
    result = subprocess.run(
        [*launcher, sys.executable, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=launch_env(backend),
    )
    found = reports(result.stdout)
    assert len(found) == 2, result.stdout + result.stderr
    return sorted(found, key=lambda r: r["rank"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_two_ranks_shard_gather_reduce_and_compare_configs(backend):
    same = _launch("distributed/worker_helpers.py", "cfg-a", "cfg-a", backend=backend)
    assert [r["size"] for r in same] == [2, 2]
    assert [r["backend"] for r in same] == [backend, backend]
    assert [r["shard"] for r in same] == [[0, 4], [4, 8]]
    assert same[0]["gathered"] == [0.0, 0.0, 1.0, 1.0] == same[1]["gathered"]
    assert same[0]["sum"] == 3.0
    assert same[0]["metrics"] == {
        "reward": 0.5,
        "clip_ratio/low_min": 0.0,
        "clip_ratio/high_max": 1.0,
    }
    assert same[0]["config"] == "same"
    assert (
        "prompts per step (3) must be divisible by the number of processes (2)"
        in same[0]["shard_error"]
    )
    differ = _launch("distributed/worker_helpers.py", "cfg-a", "cfg-b", backend=backend)
    assert all("ranks [1] have a different resolved config" in r["config"] for r in differ)


@pytest.mark.slow
def test_the_launcher_sleeps_while_its_processes_do():
    """pipelines.launch is mlx.launch without its busy wait: two ranks that sleep 3 s under it
    cost well under a CPU second, launcher included (mlx.launch 0.32 itself: about 4 s, one
    core and more, on the 2-core CPU), and their output and failures still come through."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sleeper = "import os, time; time.sleep(3); print('rank', os.environ['MLX_RANK']); exit(3)"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.launch", "-n", "2", "--backend", "ring"]
        + [sys.executable, "-c", sleeper],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, cpu
    assert sorted(result.stdout.split("\n")[:2]) == ["rank 0", "rank 1"], result.stdout
    assert "Node with rank 1 exited with code 3" in result.stderr


def test_an_unavailable_backend_stops_the_cli_with_one_line(capsys, monkeypatch):
    from pipelines import grpo

    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    # ring needs the rank and hostfile that mlx.launch provides: a lone process has neither.
    assert grpo.main(["+experiment=quickstart", "distributed.backend=ring"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: distributed backend 'ring' is not available")
    assert "\n" not in err


@pytest.mark.slow
def test_two_ranks_update_like_one_process_for_every_loss_type():
    from stages.losses import LOSS_TYPES

    reports = _launch("distributed/worker_update.py")
    for report in reports:
        assert report["same_samples"]  # a rank's share draws what one process draws for it
        for case in [*LOSS_TYPES, "dapo-entropy", "grpo-sampler-correction"]:
            got = report[case]
            assert got["moved"] > 1e-3, case  # the update did something
            # float32: the same global gradient up to summation order.
            assert got["weights"] < 1e-5, (case, got)
            assert got["loss"] < 1e-5 and got["grad_norm"] < 1e-4, (case, got)
        # the entropy metric: one micro-batch over both ranks, as one process's whole batch
        assert report["dapo-entropy"]["entropy"] < 1e-5
