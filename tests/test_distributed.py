"""Multi-process runs: merged observer statistics, and a 2-process torchrun (gloo) QAT run."""

import json
import os
import signal
import subprocess
import sys
import threading
import textwrap

import numpy as np
import pytest
import torch
import yaml

import deployq
from deployq.qat import checkpoint as ck
from deployq.qat import loading
from deployq.train import distributed as dd
from deployq.qat.observers import create_observer
from deployq.examples import zoo
from deployq.core.qspec import QuantSpec


class ThreadReducer:
    """A StatisticsReducer for `world` threads: each call blocks until every thread has posted
    its array, then all receive the same element-wise result (what all_reduce does)."""

    def __init__(self, world):
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def for_rank(self, rank):
        shared = self

        class Rank:
            def _combine(self, values, op):
                shared.slots[rank] = np.array(values, dtype=np.float64)
                shared.barrier.wait()
                result = op(np.stack(shared.slots), axis=0)
                shared.barrier.wait()
                return result

            def min(self, values):
                return self._combine(values, np.min)

            def max(self, values):
                return self._combine(values, np.max)

            def sum(self, values):
                return self._combine(values, np.sum)

        return Rank()


def merged(observers, channels):
    reducer = ThreadReducer(len(observers))
    threads = [threading.Thread(target=o.reduce, args=(reducer.for_rank(r), channels)) for r, o in enumerate(observers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return [o.qparams() for o in observers]


def observe(kind, batches, per_channel=False, **args):
    spec = QuantSpec(bits=8, per_channel=per_channel, observer=kind, observer_args=args)
    obs = create_observer(spec, 1 if per_channel else None, "layer")
    for b in batches:
        obs.update(b)
    return obs


def shards(rng):
    """Two ranks with different distributions (and ranges), 2 batches each, 3 channels."""
    return [[torch.from_numpy(rng.normal(r, 1 + r, size=(4, 3, 32)).astype(np.float32)) for _ in range(2)]
            for r in range(2)]


@pytest.mark.parametrize("per_channel", [False, True])
def test_merged_minmax_equals_one_observer_over_all_batches(rng, per_channel):
    data = shards(rng)
    ranks = merged([observe("minmax", d, per_channel) for d in data], channels=3)
    whole = observe("minmax", data[0] + data[1], per_channel).qparams()
    for scale, zero_point in ranks:
        np.testing.assert_array_equal(scale, whole[0])
        np.testing.assert_array_equal(zero_point, whole[1])


@pytest.mark.parametrize("kind", ["percentile", "mse", "kl"])
def test_merged_histograms_agree_across_ranks_and_with_one_observer(rng, kind):
    data = shards(rng)
    observers = [observe(kind, d) for d in data]
    (s0, z0), (s1, z1) = merged(observers, channels=1)
    assert s0 == s1 and z0 == z1  # bit-identical on every rank
    assert observers[0].batches == 4
    whole_scale, _ = observe(kind, data[0] + data[1]).qparams()
    assert float(s0) == pytest.approx(float(whole_scale), rel=0.1)


def test_merged_moving_averages_are_weighted_by_batches(rng):
    data = shards(rng)
    data[1] = data[1][:1]  # rank 1 saw one batch, rank 0 two
    observers = [observe("ema_minmax", d) for d in data]
    local = [(o.min.clone(), o.max.clone()) for o in observers]
    (s0, z0), (s1, z1) = merged(observers, channels=1)
    assert s0 == s1 and z0 == z1
    expected_min = (2 * local[0][0].double() + local[1][0].double()) / 3
    torch.testing.assert_close(observers[1].min, expected_min.float())


def test_a_rank_that_saw_nothing_gets_the_others_statistics(rng):
    data = shards(rng)[0]
    for kind in ("minmax", "percentile"):
        spec = QuantSpec(bits=8, per_channel=True, observer=kind)
        idle = create_observer(spec, 1, "layer")
        (s_busy, _), (s_idle, _) = merged([observe(kind, data, per_channel=True), idle], channels=3)
        np.testing.assert_array_equal(s_busy, s_idle)


def test_single_process_helpers_are_identities():
    ctx = dd.init()
    assert not ctx.distributed and ctx.is_main and ctx.world_size == 1
    assert dd.all_reduce_sums([1.5, 2], ctx) == [1.5, 2.0]
    assert dd.shard(5, dd.Context(rank=1, world_size=2)) == [1, 3]
    qmodel = deployq.prepare(zoo.unet(width=4), torch.randn(1, 3, 16, 16))
    assert dd.all_reduce_observers(qmodel) == 0


WORKER = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
import deployq
from deployq.train import distributed as dd
from deployq.examples import zoo
from deployq.train.loop import train

out = Path(sys.argv[1])
ctx = dd.init()
gen = torch.Generator().manual_seed(100 + ctx.rank)
batches = [torch.randn(2, 3, 16, 16, generator=gen) * (1 + ctx.rank) for _ in range(3)]
torch.save(batches, out / f"batches{ctx.rank}.pt")
qmodel = deployq.prepare(zoo.unet(width=4), torch.randn(1, 3, 16, 16))
deployq.calibrate(qmodel, batches, progress=False, reduce=dd.all_reduce_observers)
dump = lambda model: json.dumps({n: r.to_json() for n, r in deployq.qparams_of(model).items()})
(out / f"calibrated{ctx.rank}.json").write_text(dump(qmodel))
result = train(out / "recipe.yaml", progress=False)
(out / f"trained{ctx.rank}.json").write_text(dump(result.model))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_agree_on_qparams_and_write_one_checkpoint(tmp_path, rng):
    torch.save(zoo.unet(width=4, seed=1).state_dict(), tmp_path / "float.pth")
    x = rng.random((16, 3, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "train.npz", input=x, target=x)
    np.savez(tmp_path / "val.npz", input=x[:5], target=x[:5])
    recipe = {"model": {"factory": "deployq.examples.zoo:unet", "kwargs": {"width": 4}, "weights": "float.pth"},
              "data": {"kind": "npz", "train": "train.npz", "val": "val.npz"}, "loss": "l1", "epochs": 2,
              "batch_size": 4, "calibration_batches": 4, "lr": 1e-3, "distill": {"layers": {"enc2.2": 0.5}},
              "output_dir": "run"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "worker.py"), str(tmp_path)]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        output, _ = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # torchrun and the workers it started
        output, _ = run.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{output[-3000:]}")
    assert run.returncode == 0, output[-3000:]

    calibrated = [json.loads((tmp_path / f"calibrated{r}.json").read_text()) for r in range(2)]
    assert calibrated[0] == calibrated[1]  # every rank computed the same scales
    single = deployq.prepare(zoo.unet(width=4), torch.randn(1, 3, 16, 16))
    everything = [b for r in range(2) for b in torch.load(tmp_path / f"batches{r}.pt", weights_only=True)]
    deployq.calibrate(single, everything, progress=False)
    assert calibrated[0] == json.loads(json.dumps({n: q.to_json() for n, q in deployq.qparams_of(single).items()}))

    trained = [json.loads((tmp_path / f"trained{r}.json").read_text()) for r in range(2)]
    assert trained[0] == trained[1]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["best.pt", "last.pt", "metrics.csv", "metrics.json", "state.pt"]  # rank 0 only, no leftovers
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3
    last = loading.build(ck.load(tmp_path / "run" / "last.pt"))
    assert json.loads(json.dumps({n: q.to_json() for n, q in deployq.qparams_of(last).items()})) == trained[0]
