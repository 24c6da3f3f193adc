"""A/B on the GPU: prefill attention over the 1000-request trace's prefill steps, against its FLOP limit and
torch's flash attention (varlen) over the same requests.

The trace (`sharegpt_like(1000)`, seed 0: prompts of 4-1024 tokens, mean 151) starts with every request
admitted (max_num_seqs 1024 on an H200), so its prompts fill the first steps of 16384 batched tokens, each
step's budget less one token per request already decoding, the last prompt of a step chunked. Each step's
prefill part (its requests' cached context and new tokens, K/V in shuffled 16-token blocks, llama-3.1-8b's
heads) is timed by CUDA-graph replays of one layer's kernel, for every config of CONFIGS; rounds interleave with
the order alternating; medians and spread per config of the trace's total (x 32 layers) and of its rate against
the attention FLOPs (4 * head_dim per unmasked query-key pair per head). Every config's output is checked
against the default's. "work*": the kernel over a list of (request, query block) pairs (prefill_work), in
the engine's order or another (work_orders), instead of a grid of every request by the longest one's blocks.
The reference rate: torch's `varlen_attn` (flash attention over contiguous K/V, causal) over the same steps,
where this torch has it. CONFIGS change the engine's tile (triton_prefill.GPU_TILE) one setting at a time:
prefill_trace_ab_h200.json ran with the former tile, 128 x 32, 4 warps, 3 stages.

    PYTHONPATH=. python3 benchmarks/prefill_trace_ab.py ROUNDS OUT.json [--scan]

--scan: every tile of scan_configs() (block_m x block_n x warps x stages) instead of CONFIGS, over the trace's
steps and two long-prompt cases (8 fresh prompts of 2048 tokens; 4 chunks of 2048 after 6144 cached), each
config's total per case; configs sorted by the trace's time.
"""
import inspect
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_attention import BLOCK_SIZE, DTYPE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALE  # noqa: E402
from engine.kernels.metadata import prefill_work  # noqa: E402
from engine.kernels.triton_prefill import prefill_attention, prefill_block_q  # noqa: E402
from engine.quant.tuning import _graph_time  # noqa: E402
from kv_layout_ab import start  # noqa: E402
from workbench.workloads import sharegpt_like  # noqa: E402

NUM_LAYERS, BUDGET = 32, 16384
CONFIGS = {"default": {}, "pv_plain": dict(precise_pv=False), "m64": dict(block_m=64),
           "n64_w8": dict(block_n=64, num_warps=8), "m64_n64": dict(block_m=64, block_n=64),
           "n64_w4": dict(block_n=64, num_warps=4), "work": dict(work="engine"),
           "work_batch": dict(work="batch"), "work_batch_desc": dict(work="batch_desc"),
           "work_keys_first": dict(work="keys_first")}


def prefill_steps(prompt_lens: list[int], budget: int = BUDGET) -> list[list[tuple[int, int]]]:
    """Each step's prefill part as (cached context, new tokens) per request, as the scheduler packs them."""
    steps, pending, decoding = [], [(0, n) for n in prompt_lens], 0
    while pending:
        room, step = budget - decoding, []
        while pending and room > 0:
            done, total = pending[0]
            take = min(total - done, room)
            step.append((done, take))
            room -= take
            if done + take == total:
                pending.pop(0)
                decoding += 1
            else:
                pending[0] = (done + take, total)
        steps.append(step)
    return steps


def step_inputs(step, gen):
    lens = [c + n for c, n in step]
    blocks = [-(-s // BLOCK_SIZE) for s in lens]
    perm = torch.randperm(sum(blocks), device="cuda", generator=gen).to(torch.int32)
    tables = torch.zeros(len(step), max(blocks), dtype=torch.int32, device="cuda")
    at = 0
    for i, b in enumerate(blocks):
        tables[i, :b] = perm[at:at + b]
        at += b
    k, v = (torch.randn(sum(blocks), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
            for _ in range(2))
    qlens = torch.tensor([n for _, n in step])
    qsl = torch.zeros(len(step) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qlens, 0)
    q = torch.randn(int(qsl[-1]), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    flops = 4 * HEAD_DIM * NUM_HEADS * sum(n * c + n * (n + 1) // 2 for c, n in step)
    block_q = prefill_block_q(NUM_HEADS // NUM_KV_HEADS, True)
    work = prefill_work(qlens.numpy(), lens, block_q)
    works = {name: torch.from_numpy(w).cuda() for name, w in work_orders(work, qlens.numpy(), lens, block_q).items()}
    return dict(works=works, q=q, k=k, v=v, tables=tables, qsl=qsl.cuda(),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"), max_q=int(qlens.max()), flops=flops,
                lens=lens)


def work_orders(work: np.ndarray, qlens: list[int], lens: list[int], block_q: int) -> dict:
    """The engine's list (requests longest first, each one's blocks together, descending) and the same pairs in
    other orders: the batch's, with blocks ascending or descending, and every pair by the keys its block's last
    token sees, most first (the engine's order before prefill_work_orders_h200.json)."""
    seq, block = work >> 16, work & 0xFFFF
    qlens, lens = np.asarray(qlens), np.asarray(lens)
    keys = (lens - qlens)[seq] + np.minimum((block + 1) * block_q, qlens[seq])
    return {"engine": work, "batch": np.sort(work), "batch_desc": work[np.lexsort((-block, seq))],
            "keys_first": work[np.argsort(-keys, kind="stable")]}


def flash_reference(s):
    """torch's varlen flash attention over the step's K/V gathered contiguous (None where this torch lacks it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    ks, vs, cu_k = [], [], [0]
    for i, n in enumerate(s["lens"]):
        idx = s["tables"][i, :-(-n // BLOCK_SIZE)].long()
        ks.append(s["k"][idx].flatten(0, 1)[:n])
        vs.append(s["v"][idx].flatten(0, 1)[:n])
        cu_k.append(cu_k[-1] + n)
    k, v = torch.cat(ks), torch.cat(vs)
    cu_k = torch.tensor(cu_k, dtype=torch.int32, device="cuda")
    params = inspect.signature(varlen_attn).parameters
    causal = dict(is_causal=True) if "is_causal" in params else dict(window_size=(-1, 0))
    gqa = dict(enable_gqa=True) if "enable_gqa" in params else {}
    if not gqa:
        k, v = (t.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1) for t in (k, v))
    max_k = max(s["lens"])

    return lambda: varlen_attn(s["q"], k, v, s["qsl"], cu_k, s["max_q"], max_k, scale=SCALE, **causal, **gqa)


def scan_configs() -> dict:
    """--scan: tiles x warps x stages (P @ V as the engine runs it), and the default tile with a plain P @ V."""
    configs = {"default": {}, "pv_plain": dict(precise_pv=False)}
    for bm, bn, w, st in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3)):
        configs[f"m{bm}_n{bn}_w{w}_s{st}"] = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
    return configs


def kernel_runs(cfg: dict, inputs: list) -> list:
    """(fn, out) per step: one layer's prefill_attention over the step with cfg (compiled and run once here)."""
    fns = []
    for s in inputs:
        out = torch.empty_like(s["q"])
        kw = dict(cfg, work=s["works"][cfg["work"]]) if "work" in cfg else cfg
        fn = (lambda s=s, out=out, kw=kw: prefill_attention(
            s["q"], s["k"], s["v"], s["tables"], s["seq_lens"], s["qsl"], out, SCALE, max_query_len=s["max_q"],
            **kw))
        fn()
        fns.append((fn, out))
    return fns


def main():
    rounds, out_path, gen, _, res = start("prefill_trace_ab.py")
    configs = scan_configs() if "--scan" in sys.argv else CONFIGS
    work = sharegpt_like(1000, vocab_size=128256, seed=0)
    steps = prefill_steps([r.prompt_len for r in work.requests])
    cases = {"trace": [step_inputs(s, gen) for s in steps]}
    if "--scan" in sys.argv:  # long prompts too: 8 fresh ones of 2048 tokens, 4 chunks of 2048 after 6144 cached
        cases["dense_8x2048"] = [step_inputs([(0, 2048)] * 8, gen)]
        cases["chunk_4x2048_after_6144"] = [step_inputs([(6144, 2048)] * 4, gen)]
    flops = {case: NUM_LAYERS * sum(s["flops"] for s in inputs) for case, inputs in cases.items()}
    print(f"{len(steps)} prefill steps, {sum(len(s) for s in steps)} request parts, "
          f"{flops['trace'] / 1e12:.2f} TFLOP of attention over 32 layers", flush=True)
    runs, diffs = {}, {}
    for name, cfg in configs.items():
        try:
            runs[name] = {case: kernel_runs(cfg, inputs) for case, inputs in cases.items()}
        except Exception as exc:  # e.g. a tile past the shared memory of this GPU
            print(f"{name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        diffs[name] = max((o.float() - ref.float()).abs().max().item() for case in cases
                          for (_, o), (_, ref) in zip(runs[name][case], runs["default"][case]))
    print("max |diff| against the default config:", {k: f"{v:.3g}" for k, v in diffs.items()}, flush=True)
    flash = [flash_reference(s) for s in cases["trace"]]
    if all(f is not None for f in flash):
        try:
            flash_out = [f() for f in flash]
            err = max((fo.float() - o.float()).abs().max().item()
                      for fo, (_, o) in zip(flash_out, runs["default"]["trace"]))
            print(f"varlen flash attention against the default config: max |diff| {err:.3g}", flush=True)
            runs["torch_flash"] = {"trace": [(f, None) for f in flash]}
            diffs["torch_flash"] = err
        except Exception as exc:  # a torch build without flash attention for this GPU
            print(f"varlen flash attention unavailable: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    times = {name: {case: [] for case in by_case} for name, by_case in runs.items()}
    for r in range(rounds):
        names = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in names:
            for case, fns in runs[name].items():
                times[name][case].append(NUM_LAYERS * sum(_graph_time(fn, 1) for fn, _ in fns))
    res.update(num_steps=len(steps), step_parts=[len(s) for s in steps], attention_flops=flops,
               max_abs_diff=diffs, configs=configs, results={})
    base = {case: statistics.median(ts) for case, ts in times["default"].items()}
    for name in sorted(times, key=lambda n: statistics.median(times[n]["trace"])):
        row = {}
        for case, ts in times[name].items():
            med = statistics.median(ts)
            row[case] = dict(ms=ts, median_ms=med, spread_ms=[min(ts), max(ts)],
                             tflops=flops[case] / (med * 1e-3) / 1e12, over_default=base[case] / med)
        res["results"][name] = row
        print(f"{name:16s} " + "  ".join(
            f"{case} {v['median_ms']:7.2f} ms ({v['spread_ms'][0]:.2f}-{v['spread_ms'][1]:.2f}) "
            f"{v['tflops']:5.1f} TFLOP/s {v['over_default']:.3f}x" for case, v in row.items()), flush=True)
    Path(out_path).write_text(json.dumps(res, indent=1))
    print("results:", out_path)


if __name__ == "__main__":
    main()
