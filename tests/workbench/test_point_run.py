"""PointWorker.prepare: the model loaded ahead of a point (a Ray actor's constructor) is the one the point then
runs on, not loaded again, and the point measures what a worker without prepare() measures."""
from engine import EngineConfig
from workbench import Sweep
from workbench.point_run import PointWorker
from workbench.schema import C


def _points(tmp_path):
    return Sweep(model="tiny", workload="fixed", workload_args={"prompt_len": 8, "output_len": 4}, num_requests=4,
                 grid={"block_size": [8, 16]}, base_config=EngineConfig(device="cpu", max_model_len=64),
                 out=str(tmp_path / "r.jsonl"), progress=False, warmup=False).points


def test_prepare_loads_the_model_the_point_then_runs_on(tmp_path):
    points = _points(tmp_path)
    worker = PointWorker("tiny", warmup=False)
    worker.prepare((points[0], 0))  # a sweep's (point, repeat) item, as a Ray actor gets it
    llm, engine = worker.llm, worker.llm.engine
    assert llm.config.block_size == 8 and worker.rates is not None
    prepare_s = worker._prepared[1]
    out, frames = worker((points[0], 0))
    assert out[C.point_duration_s] >= prepare_s > 0  # the load counts as the point's, as in a sequential sweep
    assert worker.llm is llm and worker.llm.engine is engine  # not loaded, not even reconfigured, again
    fresh_out, _ = PointWorker("tiny", warmup=False)(points[0])
    same = [C.status, C.total_output_tokens, C.kv_blocks, C.num_preemptions]
    assert {k: out[k] for k in same} == {k: fresh_out[k] for k in same} and out[C.status] == "ok"
    # the next point (another config) reconfigures the same weights, as in a sequential sweep
    out2, _ = worker(points[1])
    assert worker.llm is llm and worker.llm.engine is not engine and worker.llm.config.block_size == 16
    assert out2[C.status] == "ok"


def test_a_failed_prepare_leaves_the_point_to_load_and_record_its_error(tmp_path):
    points = _points(tmp_path)
    worker = PointWorker("no-such-preset", warmup=False)
    try:
        worker.prepare(points[0])
    except ValueError as e:
        assert "no-such-preset" in str(e)
    else:
        raise AssertionError("prepare() of an unknown preset must raise")
    out, frames = worker(points[0])
    assert out[C.status] == "error" and "no-such-preset" in out[C.error] and not frames
