"""Executors: the Ray executor runs the same points to the same results as the sequential one, keeps one
runner per worker, and survives a worker that dies mid-point."""
import os

import pytest
import torch

from workbench.executors import RayExecutor, SequentialExecutor, make_executor

ray = pytest.importorskip("ray")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CountingRunner:
    """A stand-in for a loaded model: counts its own points and tags each result with its process."""

    def __init__(self):
        self.loads_seen = 0

    def __call__(self, point):
        if point.get("crash"):
            os._exit(3)  # the worker process dies, as after a fatal CUDA error
        if point.get("raise"):
            raise ValueError(f"bad point {point['id']}")
        self.loads_seen += 1
        return {"id": point["id"], "value": point["id"] ** 2 + 1, "pid": os.getpid(), "nth": self.loads_seen}


class PreparingRunner(CountingRunner):
    """A runner with prepare(point), as PointWorker: records what it was prepared for before its first call."""

    def __init__(self):
        super().__init__()
        self.prepared = []

    def prepare(self, point):
        if point.get("bad_prepare"):
            raise RuntimeError(f"out of memory preparing {point['id']}")
        self.prepared.append(point["id"])

    def __call__(self, point):
        import torch

        out = super().__call__(point)
        return {**out, "prepared": list(self.prepared), "threads": torch.get_num_threads(),
                "omp": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)}


def _collect(executor, points, tp=lambda p: 1, runner=CountingRunner):
    results, errors = {}, {}
    executor.map(points, runner, lambda p, r: results.__setitem__(p["id"], r),
                 lambda p, msg: errors.__setitem__(p["id"], msg), tensor_parallel_size=tp)
    return results, errors


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(__file__)])}})
    yield
    ray.shutdown()


def test_ray_gives_the_sequential_results_over_two_workers(local_ray):
    points = [{"id": i} for i in range(6)]
    seq, seq_err = _collect(SequentialExecutor(), points)
    par, par_err = _collect(RayExecutor(num_workers=2), points)
    assert not seq_err and not par_err
    assert {k: v["value"] for k, v in par.items()} == {k: v["value"] for k, v in seq.items()}
    pids = {r["pid"] for r in par.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two actors, neither the driver
    # one runner per actor, kept warm: each actor's counters run 1..k without restarting
    for pid in pids:
        assert sorted(r["nth"] for r in par.values() if r["pid"] == pid) == list(
            range(1, 1 + sum(r["pid"] == pid for r in par.values())))


def test_a_dead_worker_fails_its_point_and_the_rest_finish(local_ray):
    points = [{"id": 0}, {"id": 1, "crash": True}, {"id": 2}, {"id": 3}, {"id": 4, "raise": True}, {"id": 5}]
    results, errors = _collect(RayExecutor(num_workers=2), points)
    assert set(results) == {0, 2, 3, 5}
    assert set(errors) == {1, 4}
    assert errors[1].startswith("worker died")
    assert "bad point 4" in errors[4]


def test_each_actor_prepares_its_first_point_in_its_constructor(local_ray):
    """An actor is created with its first point and prepares it (loads the model) before the point's call; a
    replacement for a dead actor prepares its own first point; a prepare that fails leaves the point to run."""
    results, errors = _collect(RayExecutor(num_workers=2), [{"id": i} for i in range(4)], runner=PreparingRunner)
    firsts = {r["pid"]: r["id"] for r in results.values() if r["nth"] == 1}
    assert not errors and sorted(firsts.values()) == [0, 1]  # each actor created with its first point
    for r in results.values():
        assert r["prepared"] == [firsts[r["pid"]]]  # prepared once, for the point it ran first
    # one actor, so that which one dies and what is left for its replacement is fixed
    points = [{"id": 0}, {"id": 1, "crash": True}, {"id": 2}, {"id": 3}]
    results, errors = _collect(RayExecutor(num_workers=1), points, runner=PreparingRunner)
    assert set(results) == {0, 2, 3} and errors[1].startswith("worker died")
    assert results[0]["prepared"] == [0] and results[2]["prepared"] == results[3]["prepared"] == [2]
    assert results[0]["pid"] != results[2]["pid"] == results[3]["pid"]
    results, errors = _collect(RayExecutor(num_workers=1), [{"id": 7, "bad_prepare": True}, {"id": 8}],
                               runner=PreparingRunner)
    assert not errors and results[7]["prepared"] == results[8]["prepared"] == []


def test_actors_share_the_torch_threads_of_the_driver(local_ray):
    """Ray gives an actor of one CPU OMP_NUM_THREADS=1; the actors take the driver's torch thread count instead,
    shared among the actors that run side by side (one actor: all of it, as a sequential sweep started here
    runs; two: half each, not two threads each on two cores), or num_threads when given."""
    before = torch.get_num_threads()
    want = min(2, len(os.sched_getaffinity(0)))
    torch.set_num_threads(want)
    try:
        one, _ = _collect(RayExecutor(num_workers=1), [{"id": 0}], runner=PreparingRunner)
        results, _ = _collect(RayExecutor(num_workers=2), [{"id": i} for i in range(2)], runner=PreparingRunner)
    finally:
        torch.set_num_threads(before)
    assert (one[0]["threads"], one[0]["omp"]) == (want, str(want))
    half = max(1, want // 2)
    assert {(r["threads"], r["omp"]) for r in results.values()} == {(half, str(half))}
    # Ray starts its workers at niceness 15 (this fixture's Ray too); an actor that may raise its priority
    # runs its points at the driver's
    if os.geteuid() == 0:
        assert {r["nice"] for r in results.values()} == {os.nice(0)}
    results, _ = _collect(RayExecutor(num_workers=1, num_threads=1), [{"id": 0}], runner=PreparingRunner)
    assert (results[0]["threads"], results[0]["omp"]) == (1, "1")
    with pytest.raises(ValueError, match="num_threads=0"):
        RayExecutor(num_threads=0)


def test_actor_slots_per_tensor_parallel_size_and_refusals():
    """One actor per group of tp GPUs (at most num_workers), CPU slots without GPUs, and a tp larger than the
    cluster's GPUs or a bad num_workers refused naming it (hand-computed, on a stand-in for ray)."""
    class FakeRay:
        def __init__(self, resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

    two_gpus = FakeRay({"GPU": 2.0, "CPU": 32.0})
    assert RayExecutor()._slots(two_gpus, 1) == (2, {"num_gpus": 1, "num_cpus": 1.0})
    assert RayExecutor()._slots(two_gpus, 2) == (1, {"num_gpus": 2, "num_cpus": 1.0})
    assert RayExecutor(num_workers=1)._slots(two_gpus, 1)[0] == 1
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs 4 GPUs; the Ray cluster has 2"):
        RayExecutor()._slots(two_gpus, 4)
    assert RayExecutor(cpus_per_worker=2.0)._slots(FakeRay({"CPU": 5.0}), 1) == (2, {"num_cpus": 2.0})
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_workers"):
            RayExecutor(num_workers=bad)


def test_a_local_ray_with_gpus_gets_the_cpus_of_its_actors_only():
    """Hand-computed: one CPU per GPU's actor (cpus_per_worker each, rounded up), not one idle prestarted worker
    per core; without GPUs Ray's default CPUs (they set the number of actors)."""
    assert RayExecutor()._local_resources(2) == {"num_gpus": 2, "num_cpus": min(2, os.cpu_count())}
    assert RayExecutor(cpus_per_worker=1.5)._local_resources(1) == {"num_gpus": 1, "num_cpus": min(2, os.cpu_count())}
    assert RayExecutor()._local_resources(0) == {"num_gpus": 0}


def test_make_executor_names():
    assert isinstance(make_executor(None), SequentialExecutor)
    assert isinstance(make_executor("ray", num_workers=2), RayExecutor)
    with pytest.raises(ValueError, match="executor='dask'"):
        make_executor("dask")


def test_a_ray_sweep_gives_the_rows_of_a_sequential_one(local_ray, tmp_path):
    """Four points of the shipped model over two actors: the same deterministic columns as one process."""
    from engine import EngineConfig
    from workbench import Sweep
    from workbench.schema import C

    def sweep(executor, out):
        return Sweep(model=os.path.join(ROOT, "data", "models", "pystdlib-llama-6m"), workload="shared-prefix",
                     num_requests=4, grid={"block_size": [8, 16], "enable_prefix_caching": [True, False]},
                     base_config=EngineConfig(device="cpu", max_model_len=1024), out=str(out), repeats=1,
                     progress=False, warmup=False, executor=executor, num_workers=2)

    seq = sweep("sequential", tmp_path / "seq.jsonl").run()
    ray_sweep = sweep("ray", tmp_path / "ray.jsonl")
    par = ray_sweep.run()
    same = [C.point_id, C.label, C.status, C.block_size, C.enable_prefix_caching, C.num_requests,
            C.prefix_cache_queries, C.prefix_cache_hits, C.num_preemptions, C.kv_blocks, C.total_output_tokens]
    assert (par[C.status] == "ok").all()
    assert par[same].to_dict("records") == seq[same].to_dict("records")
    assert par[C.run_host].notna().all()
    # the environment says how long Ray and each actor took to start, and which actor ran which point
    timings = ray_sweep.environment["executor_timings"]
    assert timings["ray_init_s"] >= 0 and len(timings["actors"]) == 2
    assert sorted(label for a in timings["actors"] for label in a["points"]) == sorted(par[C.label])
    assert all(a["init_s"] > 0 and a["tp"] == 1 for a in timings["actors"])


def test_ctrl_c_in_a_ray_sweep_leaves_a_file_that_resumes_only_the_rest(local_ray, tmp_path):
    """A KeyboardInterrupt while a Ray sweep runs (here: raised as the first row arrives) stops it with that row
    saved; the same sweep run again skips it and runs only the other points."""
    from engine import EngineConfig
    from workbench import Sweep
    from workbench.schema import C

    def sweep(on_point):
        return Sweep(model="tiny", workload="fixed", workload_args={"prompt_len": 8, "output_len": 4}, num_requests=4,
                     grid={"block_size": [8, 16, 32]}, base_config=EngineConfig(device="cpu", max_model_len=64),
                     out=str(tmp_path / "r.jsonl"), repeats=1, progress=False, warmup=False, executor="ray",
                     num_workers=1, on_point=on_point)

    saved = []

    def interrupt(row):
        saved.append(row[C.label])
        raise KeyboardInterrupt

    first = sweep(interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert first.saved_points() == 1 and len(saved) == 1
    rerun = []
    second = sweep(lambda row: rerun.append(row[C.label]))
    df = second.run()
    assert second.skipped == 1 and sorted(rerun + saved) == sorted(["bs=8", "bs=16", "bs=32"])
    assert len(df) == 3 and (df[C.status] == "ok").all()


def _load_bench():
    import importlib.util

    path = os.path.join(ROOT, "benchmarks", "ray_sweep_bench.py")
    spec = importlib.util.spec_from_file_location("ray_sweep_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_sweep_bench_smoke_gives_matching_rows_and_a_summary(local_ray, tmp_path):
    """benchmarks/ray_sweep_bench.py's sweep (each executor's part, run here under the test's Ray) and its
    comparison: same points and token counts on both executors, a wall-time ratio and per-point ratios."""
    bench = _load_bench()
    spec = {"model": "tiny", "workload": "fixed", "workload_args": {"prompt_len": 8, "output_len": 4},
            "num_requests": 4, "grid": {"block_size": [8, 16]}, "base": {"device": "cpu", "max_model_len": 64},
            "dtype": None, "num_workers": 2}
    seq = bench.run_child({**spec, "executor": "sequential", "out": str(tmp_path / "seq.jsonl")})
    par = bench.run_child({**spec, "executor": "ray", "out": str(tmp_path / "ray.jsonl")})
    assert [r["label"] for r in par["rows"]] == [r["label"] for r in seq["rows"]] == ["bs=8", "bs=16"]
    tokens = [r["total_output_tokens"] for r in par["rows"]]
    assert tokens == [r["total_output_tokens"] for r in seq["rows"]] == [16, 16]
    assert len(par["finished_at_s"]) == 2 and par["wall_s"] >= max(par["finished_at_s"])
    assert 0 <= seq["startup_s"] <= min(seq["finished_at_s"]) and 0 <= par["startup_s"] <= min(par["finished_at_s"])
    s = bench.summarise([seq, par], max_wall_ratio=0.6, max_throughput_dev=0.05)
    assert s["complete_pairs"] == 1 and s["points_failed"] == 0
    assert s["wall_ratio_per_pair"] == [par["wall_s"] / seq["wall_s"]]
    for label, row in s["per_point"].items():
        ray_row = next(r for r in par["rows"] if r["label"] == label)
        seq_row = next(r for r in seq["rows"] if r["label"] == label)
        assert row["ray_over_sequential"] == pytest.approx(ray_row["output_throughput"] / seq_row["output_throughput"])
    assert "single measurement" in s["noise_note"]
    assert bench.summarise([seq], 0.6, 0.05) == {"complete_pairs": 0}  # a pair lost to a failure: no ratio
    # The calibration's form: one sweep per part, each with its own request count.
    parts = [{"grid": {"block_size": [8]}, "num_requests": 2}, {"grid": {"block_size": [16]}, "num_requests": 6}]
    cal = bench.run_child({**spec, "executor": "sequential", "parts": parts, "out": str(tmp_path / "cal.jsonl")})
    assert [(r["label"], r["num_requests"], r["total_output_tokens"]) for r in cal["rows"]] == [
        ("bs=8", 2, 8), ("bs=16", 6, 24)]


def test_a_ray_sweep_runs_tensor_parallel_points_on_an_actor_of_their_own(local_ray, tmp_path):
    """tensor_parallel_size as a sweep dimension on Ray: the tp=2 and tp=1 points run in separate groups of
    actors (a tp=2 actor drives its own tensor-parallel worker, here gloo on the CPU), each with the token
    counts of the workload and the KV pool the planner predicts (as the sequential sweep in
    tests/engine/test_tensor_parallel.py)."""
    from engine import EngineConfig
    from workbench import Sweep
    from workbench.planner import plan
    from workbench.schema import C

    base = EngineConfig(device="cpu", max_model_len=128)
    df = Sweep(model="tiny", workload="shared-prefix", num_requests=4, progress=False, warmup=False,
               workload_args=dict(num_prefixes=1, prefix_len=32, suffix_len=8, output_len=4),
               grid={"tensor_parallel_size": [2, 1]}, base_config=base, out=str(tmp_path / "ray.jsonl"), repeats=1,
               executor="ray", num_workers=1).run()
    assert (df[C.status] == "ok").all(), df[C.error].tolist()
    assert list(df[C.tensor_parallel_size]) == [2, 1] and list(df[C.label]) == ["tp=2", "tp=1"]
    assert (df[C.total_output_tokens] == 16).all() and (df[C.prefix_cache_hits] > 0).all()
    for tp, blocks in zip(df[C.tensor_parallel_size], df[C.kv_blocks]):
        assert plan("tiny", "cpu", base, tensor_parallel_size=tp, dtype="float32").num_gpu_blocks == blocks


def test_a_ray_sweep_ships_a_factory_that_pickles_without_the_sweep(tmp_path):
    """On a GPU the Sweep holds NVML telemetry (ctypes handles Ray cannot pickle): the actors' factory must not
    carry the Sweep (a bound method did, and every Ray sweep on an H200 failed before its first point)."""
    import ctypes
    import pickle

    from engine import EngineConfig
    from workbench import Sweep
    from workbench.point_run import PointWorker

    s = Sweep(model=os.path.join(ROOT, "data", "models", "pystdlib-llama-6m"), workload="shared-prefix", num_requests=4,
              grid={"block_size": [8, 16]}, base_config=EngineConfig(device="cpu"), out=str(tmp_path / "r.jsonl"),
              progress=False, warmup=False, executor="ray", num_workers=2)
    s.nvml_handle = ctypes.pointer(ctypes.c_int(0))  # what pynvml's device handles are
    with pytest.raises(ValueError):
        pickle.dumps(s)
    factory = pickle.loads(pickle.dumps(s._worker_factory()))
    assert factory.func is PointWorker and factory.args[0] == s.model
