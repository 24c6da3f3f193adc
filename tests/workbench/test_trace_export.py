"""The Chrome trace-event export: every event's fields, the nesting of steps/phases and of request tracks."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest

from engine import LLM, EngineConfig, SamplingParams
from workbench.metrics import request_frame, steps_frame
from workbench.trace_export import chrome_trace, request_phases, write_chrome_trace

EPS = 0.002  # microseconds: timestamps are rounded to the nanosecond


def test_request_phases_of_a_hand_made_request():
    req = SimpleNamespace(arrival_time=0.0, first_token_time=2.0, finished_time=10.0)
    phases = request_phases(req, [(1.0, 2.0, 10, 0), (7.0, 8.0, 12, 11)], [5.0])
    assert [(n, s, e) for n, s, e, _ in phases] == [("queued", 0, 1), ("prefill", 1, 2), ("decode", 2, 5),
                                                    ("preempted", 5, 7), ("prefill", 7, 8), ("decode", 8, 10)]
    assert phases[4][3] == {"tokens": 12, "recomputed": 11}
    # Without request events: the request's own timestamps.
    req.first_scheduled_time = 0.5
    assert [(n, s, e) for n, s, e, _ in request_phases(req, [], [])] == [("queued", 0, 0.5), ("prefill", 0.5, 2),
                                                                         ("decode", 2, 10)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # A small pool (preemptions), a small budget (chunked prefill), and deep mode (kernel track).
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=4, num_gpu_blocks=24, max_num_batched_tokens=32,
                       enable_prefix_caching=False)
    llm = LLM.random("tiny", cfg)
    prompts = [[5 + i] * (10 + 7 * i) for i in range(6)]
    llm.engine.profile_kernels(first_step=2, num_steps=2)  # a short window: the CPU profiler is slow
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    st = llm.engine.stats()
    steps, reqs = steps_frame(st), request_frame(outs)
    path = write_chrome_trace(tmp_path_factory.mktemp("trace") / "run.json", steps, reqs, st.request_events,
                              st.kernel_profile)
    return st, steps, reqs, json.loads(path.read_text())


def test_every_event_has_the_fields_of_its_phase(run):
    st, steps, reqs, trace = run
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms" and events
    for e in events:
        assert e["ph"] in {"M", "X", "C", "b", "e"}
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and isinstance(e["name"], str) and e["name"]
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and isinstance(e["args"]["name"], str)
            continue
        assert isinstance(e["ts"], (int, float)) and math.isfinite(e["ts"]) and e["ts"] >= -EPS
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
        if e["ph"] in "be":
            assert e["cat"] == "request" and isinstance(e["id"], str)
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values())
    by = defaultdict(int)
    for e in events:
        by[(e["ph"], e.get("cat"))] += 1
    assert by[("X", "step")] == len(steps) == st.num_steps
    assert by[("X", "phase")] == 5 * len(steps)
    assert by[("X", "device")] == len(steps)  # the CPU's forward wall time
    assert by[("C", None)] == 2 * len(steps)
    assert sum(n for (ph, cat), n in by.items() if ph == "X" and cat not in ("step", "phase", "device")) == len(
        st.kernel_profile.kernels) > 0


def test_complete_events_nest_on_each_thread(run):
    _, steps, _, trace = run
    threads = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            threads[(e["pid"], e["tid"])].append(e)
    for key, evs in threads.items():
        stack = []
        for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - EPS:
                stack.pop()
            if stack:  # inside its parent, never straddling its end
                assert e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + EPS, (key, e, stack[-1])
            stack.append(e)
    step_events = [e for e in trace["traceEvents"] if e.get("cat") == "step"]
    phases = [e for e in trace["traceEvents"] if e.get("cat") == "phase"]
    for i, s in enumerate(step_events):
        mine = phases[5 * i:5 * i + 5]
        assert [p["name"] for p in mine] == ["schedule", "prepare", "launch", "sample", "output"]
        assert all(s["ts"] - EPS <= p["ts"] and p["ts"] + p["dur"] <= s["ts"] + s["dur"] + EPS for p in mine)
        assert sum(p["dur"] for p in mine) == pytest.approx(s["dur"], abs=0.01)


def test_request_tracks_are_balanced_ordered_and_complete(run):
    st, _, reqs, trace = run
    tracks = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] in "be":
            tracks[e["id"]].append(e)
    assert set(tracks) == set(reqs["request_id"])
    preempted = {rid: sum(1 for _, r, k, _ in st.request_events if r == rid and k == "preempted") for rid in tracks}
    assert sum(preempted.values()) == st.num_preemptions > 0
    for rid, evs in tracks.items():
        assert evs[0]["ph"] == "b" and evs[0]["name"] == "request"
        assert evs[-1]["ph"] == "e" and evs[-1]["name"] == "request"
        stack, last_end, names = [], -math.inf, []
        for e in evs:
            if e["ph"] == "b":
                assert all(e["ts"] >= s["ts"] - EPS for s in stack)
                if len(stack) == 1:  # phases follow one another without overlapping
                    assert e["ts"] >= last_end - EPS
                    names.append(e["name"])
                stack.append(e)
            else:
                top = stack.pop()
                assert top["name"] == e["name"] and e["ts"] >= top["ts"] - EPS
                if len(stack) == 1:
                    last_end = e["ts"]
        assert not stack
        assert set(names) <= {"queued", "prefill", "decode", "preempted"}
        assert names.count("preempted") == preempted[rid]
        assert names.count("prefill") == sum(1 for _, r, k, _ in st.request_events if r == rid and k == "prefill")
        row = reqs.set_index("request_id").loc[rid]
        assert evs[0]["ts"] == pytest.approx((row["arrival_time"] - trace["otherData"]["t0_perf_counter_s"]) * 1e6,
                                             abs=EPS)


def test_empty_run_gives_a_valid_trace():
    from workbench.metrics import request_frame, steps_frame
    trace = chrome_trace(steps_frame(SimpleNamespace(steps=[])), request_frame([]))
    assert all(e["ph"] == "M" for e in trace["traceEvents"])
    json.dumps(trace)


def test_sweep_command_writes_one_trace_per_point(tmp_path, capsys):
    from workbench.__main__ import main
    rc = main(["sweep", "--model", "tiny", "--workload", "fixed", "--num-requests", "3", "--workload-arg",
               "prompt_len=12", "--workload-arg", "output_len=3", "--grid", "block_size=8,16", "--set",
               "max_model_len=64", "--device", "cpu", "--no-progress", "--no-warmup", "--trace", str(tmp_path)])
    assert rc == 0
    files = sorted(tmp_path.glob("*.trace.json"))
    assert len(files) == 2 and capsys.readouterr().out.count("trace of bs=") == 2
    for f in files:
        events = json.loads(f.read_text())["traceEvents"]
        assert sum(e.get("cat") == "step" for e in events) > 0
        names = [e["name"] for e in events if e["ph"] == "b"]
        assert names.count("request") == 3 and {"queued", "prefill", "decode"} <= set(names)
