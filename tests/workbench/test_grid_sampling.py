"""n and beam_width as grid dimensions: the sharing counters of each point against hand-computed block counts,
bad values refused before anything runs, and the command line."""
import json
import math

import pytest

from engine import BeamSearchParams, EngineConfig, SamplingParams
from workbench import Sweep
from workbench.__main__ import main
from workbench.grid import stable_hash
from workbench.trace_replay import request_params

P, T, B, R = 10, 6, 4, 2  # prompt tokens, output tokens, block size, requests
BASE = EngineConfig(max_model_len=64, num_gpu_blocks=128, device="cpu", block_size=B, max_num_seqs=8)
WORKLOAD = dict(workload="fixed", num_requests=R, workload_args=dict(prompt_len=P, output_len=T))
SHARING = ["num_used_blocks_peak", "num_unshared_blocks_peak", "num_saved_blocks_peak", "num_shared_blocks_peak",
           "num_cow_copies", "sharing_saving"]


def cdiv(a, b):
    return -(-a // b)


def expected_parallel(n):
    """Hand count for R requests of P prompt and T output tokens with n parallel samples, blocks of B tokens.

    One sequence computes the prompt less its last token (P - 1 tokens, cdiv(P - 1, B) blocks), the others fork
    from it: cdiv(P - 1, B) blocks held by n sequences, (n - 1) x that saved (the peak of saved and shared
    blocks). Each sequence then writes the prompt's last token into the partly filled block: n - 1 copies on
    write when (P - 1) % B != 0. The last step before the request finishes holds P + T - 2 computed tokens per
    sequence (the final step computes one more and frees everything): without sharing n x cdiv(P + T - 2, B)
    blocks, with sharing the (P - 1) // B full prompt blocks once plus each sequence's own tail."""
    full, tokens = (P - 1) // B, P + T - 2
    used = full + n * (cdiv(tokens, B) - full)
    unshared = n * cdiv(tokens, B)
    return {"num_used_blocks_peak": R * used, "num_unshared_blocks_peak": R * unshared,
            "num_saved_blocks_peak": R * (n - 1) * cdiv(P - 1, B),
            "num_shared_blocks_peak": R * cdiv(P - 1, B) if n > 1 else 0,
            "num_cow_copies": R * (n - 1) * ((P - 1) % B != 0), "sharing_saving": 1 - used / unshared}


@pytest.fixture(scope="module")
def sweeps():
    parallel = Sweep(model="tiny", grid={"n": [1, 2, 4], "beam_width": [None]}, base_config=BASE, progress=False,
                     repeats=1, **WORKLOAD)
    beams = Sweep(model="tiny", grid={"beam_width": [2, 4]}, base_config=BASE, progress=False, repeats=1, **WORKLOAD)
    return parallel.run(), beams.run()


def test_parallel_sampling_points_count_the_blocks_computed_by_hand(sweeps):
    df = sweeps[0]
    assert list(df["status"]) == ["ok"] * 3 and list(df["n"]) == [1, 2, 4]
    assert df["beam_width"].isna().all() and list(df["label"]) == ["n=1 beam=none", "n=2 beam=none", "n=4 beam=none"]
    assert len(set(df["point_id"])) == 3
    for n, (_, row) in zip((1, 2, 4), df.iterrows()):
        want = expected_parallel(n)
        got = {c: row[c] for c in SHARING}
        assert got == pytest.approx(want), (n, got, want)
        assert row["total_output_tokens"] == R * n * T  # every completion's tokens
    # n=4: 20 blocks with sharing against 32 without, for these numbers
    assert expected_parallel(4)["num_used_blocks_peak"] == 20 and expected_parallel(4)["num_unshared_blocks_peak"] == 32


def test_beam_search_points_count_every_beam_and_share_the_prompt(sweeps):
    df = sweeps[1]
    assert list(df["status"]) == ["ok"] * 2 and list(df["beam_width"]) == [2, 4] and list(df["n"]) == [1, 1]
    for w, (_, row) in zip((2, 4), df.iterrows()):
        # all W beams live until the last step (ignore_eos): W block tables of P + T - 2 tokens each
        assert row["num_unshared_blocks_peak"] == R * w * cdiv(P + T - 2, B)
        # the prompt's full blocks are held once by every beam, so at least (W - 1) of each are saved
        assert row["num_saved_blocks_peak"] >= R * (w - 1) * ((P - 1) // B)
        assert R * cdiv(P + T - 2, B) <= row["num_used_blocks_peak"] <= row["num_unshared_blocks_peak"] \
            - R * (w - 1) * ((P - 1) // B)
        assert row["num_cow_copies"] >= R * (w - 1) * ((P - 1) % B != 0)  # the partial prompt block, at least
        assert row["sharing_saving"] == pytest.approx(1 - row["num_used_blocks_peak"] / row["num_unshared_blocks_peak"])
        assert row["total_output_tokens"] == R * w * T and row["num_finished"] == R


def test_request_params_route_n_and_beam_width():
    assert request_params({"n": 4}, 7) == SamplingParams(n=4, max_tokens=7, temperature=0.0, ignore_eos=True)
    assert request_params({"n": 1, "beam_width": 3, "length_penalty": 0.5}, 7) == \
        BeamSearchParams(beam_width=3, max_tokens=7, ignore_eos=True, length_penalty=0.5)
    assert request_params({"beam_width": None, "temperature": 1.0}, 2).temperature == 1.0
    with pytest.raises(ValueError, match="temperature"):
        request_params({"beam_width": 2, "temperature": 1.0}, 2)
    with pytest.raises(ValueError, match="n=2 with beam_width=2"):
        request_params({"beam_width": 2, "n": 2}, 2)
    with pytest.raises(ValueError, match="'bogus'"):
        request_params({"bogus": 1}, 2)


@pytest.mark.parametrize("grid, sampling, message", [
    ({"n": [0]}, None, "n=0 is not allowed: n must be an integer >= 1"),
    ({"n": [2.5]}, None, "n=2.5 is not allowed"),
    ({"n": [True]}, None, "n=True is not allowed"),
    ({"beam_width": [0]}, None, "beam_width=0 is not allowed: beam_width must be None (no beam search) or an "
                                "integer >= 1"),
    ({"beam_width": ["wide"]}, None, "beam_width='wide' is not allowed"),
    ({"n": [1, 2], "beam_width": [None, 2]}, None, "n=2 with beam_width=2"),
    ({"n": [16]}, None, "n=16 is more than max_num_seqs=8"),
    ({"beam_width": [2]}, {"temperature": 0.7}, "does not apply to beam search"),
    ({"n": [2]}, {"beam_width": 2}, "n=2 with beam_width=2"),
])
def test_bad_sampling_values_are_refused_before_any_run(monkeypatch, grid, sampling, message):
    import workbench.point_run

    monkeypatch.setattr(workbench.point_run, "run_point", lambda *a, **k: pytest.fail("a point ran"))
    with pytest.raises(ValueError, match="invalid grid") as e:
        Sweep(model="tiny", grid=grid, base_config=BASE, sampling=sampling, progress=False, **WORKLOAD)
    assert message in str(e.value)


def test_sampling_with_speculative_decoding_is_refused():
    cfg = BASE.replace(speculative_method="ngram", num_speculative_tokens=2)
    with pytest.raises(ValueError, match="n=2 is not combined with speculative decoding"):
        Sweep(model="tiny", grid={"n": [1, 2]}, base_config=cfg, progress=False, **WORKLOAD)


def test_points_without_grid_sampling_keep_their_ids():
    """Results files written before n / beam_width were sweepable still resume: the key of a point without
    them is the hash it always was."""
    plain = Sweep(model="tiny", grid={"block_size": [4]}, base_config=BASE, progress=False, **WORKLOAD)
    p = plain.points[0]
    legacy = stable_hash({"config": p.config.to_dict(), "workload": p.workload.fingerprint(),
                          "model": plain.model_id, "sampling": None})
    assert p.point_id == legacy and p.sampling == {}
    with_n = Sweep(model="tiny", grid={"block_size": [4], "n": [1, 2]}, base_config=BASE, progress=False, **WORKLOAD)
    assert [q.sampling for q in with_n.points] == [{"n": 1}, {"n": 2}]
    assert len({q.point_id for q in with_n.points} | {legacy}) == 3  # the grid's n is part of the key


def test_cli_sweeps_n(tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["sweep", "--model", "tiny", "--workload", "fixed", "--num-requests", str(R),
               "--workload-arg", f"prompt_len={P}", "--workload-arg", f"output_len={T}", "--grid", "n=1,2,4",
               "--set", "max_model_len=64", "--set", "num_gpu_blocks=128", "--set", f"block_size={B}",
               "--device", "cpu", "--out", str(out), "--html", str(tmp_path / "r.html"), "--no-progress",
               "--repeats", "1"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in rows] == [1, 2, 4] and all(r["beam_width"] is None for r in rows)
    for r in rows:
        assert r["num_unshared_blocks_peak"] == expected_parallel(r["n"])["num_unshared_blocks_peak"]
        assert r["num_used_blocks_peak"] == expected_parallel(r["n"])["num_used_blocks_peak"]
    assert not math.isnan(rows[2]["sharing_saving"])


def test_cli_refuses_a_bad_n_with_exit_2(tmp_path, capsys):
    rc = main(["sweep", "--model", "tiny", "--workload", "fixed", "--num-requests", "1", "--grid", "n=0,2",
               "--grid", "beam_width=none,x", "--device", "cpu", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "n=0 is not allowed" in err and "beam_width='x' is not allowed" in err
    assert not (tmp_path / "r.jsonl").exists()
