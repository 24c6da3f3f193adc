"""compile_watch records each Triton build between the JIT's cache-miss and post-compile hooks, chains the
hooks it replaced, and EngineStats counts the builds of its window only."""
import types

import pytest

triton = pytest.importorskip("triton")
knobs = pytest.importorskip("triton.knobs")

from engine.kernels import compile_watch  # noqa: E402


@pytest.fixture
def fresh_watch(monkeypatch):
    """compile_watch as in a new process, over hooks someone else installed first (recording their calls)."""
    calls = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: calls.append(("miss", kw["repr"])))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: calls.append(("built", kw["repr"])))
    monkeypatch.setattr(compile_watch, "_installed", False)
    monkeypatch.setattr(compile_watch, "events", [])
    assert compile_watch.install()
    assert compile_watch.install()  # idempotent: the hooks are not wrapped twice
    return calls


def _jit_calls(name: str, clock: list, monkeypatch, seconds: float):
    """The two hook calls the JIT makes around one build, with perf_counter advancing by `seconds`."""
    fn = types.SimpleNamespace(name=name)
    kw = dict(key=None, repr=f"{name}[num_warps=4](x: *fp32)", fn=fn, compile={}, is_manual_warmup=False,
              already_compiled=False)
    monkeypatch.setattr(compile_watch.time, "perf_counter", lambda: clock[0])
    assert knobs.runtime.jit_cache_hook(**kw) is None  # a truthy return would make Triton skip the build
    clock[0] += seconds
    knobs.runtime.jit_post_compile_hook(**kw)


def test_records_each_build_with_its_time_and_chains_previous_hooks(fresh_watch, monkeypatch):
    clock = [100.0]
    _jit_calls("_decode_split_kernel", clock, monkeypatch, 0.75)
    _jit_calls("_prefill_kernel", clock, monkeypatch, 0.25)
    assert [(e.kernel, e.seconds, e.time) for e in compile_watch.events] == [
        ("_decode_split_kernel", 0.75, 100.75), ("_prefill_kernel", 0.25, 101.0)]
    assert [c[0] for c in fresh_watch] == ["miss", "built", "miss", "built"]


def test_engine_stats_count_builds_since_reset(fresh_watch, monkeypatch):
    from engine import LLM, EngineConfig

    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, num_gpu_blocks=16))
    clock = [0.0]
    _jit_calls("before_reset", clock, monkeypatch, 1.0)
    llm.engine.reset_stats()
    assert llm.engine.stats().kernel_compiles == ()
    _jit_calls("inside", clock, monkeypatch, 0.5)
    st = llm.engine.stats()
    assert [e.kernel for e in st.kernel_compiles] == ["inside"] and st.kernel_compile_s == 0.5
    assert st.kernel_compiles[0].variant == "inside[num_warps=4](x: *fp32)"

    from workbench.metrics import engine_summary
    row = engine_summary(st)
    assert (row["kernel_compiles"], row["kernel_compile_s"], row["kernels_built"]) == (1, 0.5, "inside x1")
