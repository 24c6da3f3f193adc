"""Quantization quality on the shipped trained model (data/models/pystdlib-llama-6m), on the CPU.

Random weights say little about quality (a random 32-layer model is so sensitive that any rounding
flips its near-tied greedy choices), so this measures each mode on a real model, against its float32
weights (the checkpoint's bf16 values, upcast), with the engine's torch backend:
- held-out perplexity, by the protocol of the model's eval.json (heldout.json: each file as
  [<s>] + tokens + [</s>], concatenated, chunks of 512, every token but a chunk's first scored)
- mean KL(float || mode) of the next-token distributions and top-1 agreement over those positions
- greedy agreement over 256 generated tokens (4 prompts x 64) and the mean index of the first difference
Modes: int8, int4 (engine.quant, round-to-nearest), awq and gptq (calibrated, see below), fp8 W8A8
emulated in float32 (fp8_linear_reference: e4m3 weights and per-token e4m3 activations, the numbers
torch._scaled_mm multiplies; the real path needs a GPU with compute capability >= 8.9), the fp8 KV
cache alone, and int4 with the fp8 KV cache.

Calibration (awq, gptq): CALIB_SEQUENCES random windows of CALIB_LEN tokens (seeded) from the model's
training slice, rebuilt as scripts/train_small_model.py splits it (the local Python's stdlib `.py`
files, sorted; index % 20 not in {0, 10}), minus every file whose path is in heldout.json. The local
stdlib may be another version than the 3.12.3 the model was trained on; excluding the held-out
paths by name keeps the scored text out of calibration whatever the version.

    PYTHONPATH=. python3 benchmarks/quality_quant.py            # all modes, about 8 minutes on 2 free CPU cores
    PYTHONPATH=. python3 benchmarks/quality_quant.py awq,gptq   # some modes, merged into the recorded file

Writes data/benchmarks/quant_quality.json (after each mode, so a run cut short keeps what it measured).
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.quant import linears_to_quantize  # noqa: E402
from engine.quant.fp8 import fp8_linear_reference, quantize_fp8  # noqa: E402

MODEL_DIR = ROOT / "data" / "models" / "pystdlib-llama-6m"
PROMPTS = ["def ", "import os\n", "class Foo(",
           'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n']
CHUNK = 512
GREEDY_TOKENS = 64
CALIB_SEQUENCES = 32
CALIB_LEN = 512
MODES = {"int8": dict(quantization="int8"), "int4": dict(quantization="int4"), "awq": dict(quantization="awq"),
         "gptq": dict(quantization="gptq"), "fp8 (emulated)": "fp8",
         "kv fp8": dict(kv_cache_dtype="fp8"), "int4 + kv fp8": dict(quantization="int4", kv_cache_dtype="fp8")}


class Fp8Emulated(nn.Module):
    """W8A8 fp8 numerics in float32 on any device (engine.quant.fp8.fp8_linear_reference)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_fp8, self.weight_scale = quantize_fp8(linear.weight)
        self.bias = linear.bias

    def forward(self, x):
        out = fp8_linear_reference(x, self.weight_fp8, self.weight_scale)
        return out if self.bias is None else out + self.bias


def heldout_chunks(tokenizer) -> list[list[int]]:
    files = json.loads((MODEL_DIR / "heldout.json").read_text())["files"]
    ids = []
    for f in files:
        ids += [tokenizer.bos_token_id] + tokenizer(f["text"], add_special_tokens=False).input_ids + \
            [tokenizer.eos_token_id]
    return [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK) if len(ids[i:i + CHUNK]) > 1]


def calibration_set(tokenizer) -> tuple[list[list[int]], dict]:
    """Token windows from the training slice (never a held-out file), and a description for the JSON."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_small_model import split_files, stdlib_files
    heldout = {f["path"] for f in json.loads((MODEL_DIR / "heldout.json").read_text())["files"]}
    train, _, _ = split_files(stdlib_files())
    train = [(p, t) for p, t in train if p not in heldout]
    stream = []
    for _, text in train:
        stream += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids + \
            [tokenizer.eos_token_id]
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(stream) - CALIB_LEN, (CALIB_SEQUENCES,), generator=gen).tolist()
    seqs = [stream[s:s + CALIB_LEN] for s in starts]
    return seqs, dict(source="training slice of the local stdlib (scripts/train_small_model.py split), "
                              "held-out paths excluded", python=platform.python_version(), files=len(train),
                      stream_tokens=len(stream), sequences=CALIB_SEQUENCES, seq_len=CALIB_LEN, seed=0)


def evaluate(llm: LLM, chunks, ref_logprobs=None):
    """(log-probs per chunk, perplexity, mean KL vs ref, top-1 agreement vs ref)."""
    nll, count, kls, agree, logprobs = 0.0, 0, [], [], []
    for i, chunk in enumerate(chunks):
        lp = llm.engine.runner.prompt_logits(chunk).float().log_softmax(-1)
        target = torch.tensor(chunk[1:])
        nll -= lp[:-1].gather(1, target[:, None]).sum().item()
        count += len(chunk) - 1
        logprobs.append(lp)
        if ref_logprobs is not None:
            ref = ref_logprobs[i]
            kls.append(F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1))
            agree.append(lp.argmax(-1) == ref.argmax(-1))
    ppl = math.exp(nll / count)
    if ref_logprobs is None:
        return logprobs, ppl, None, None, count
    return logprobs, ppl, torch.cat(kls).mean().item(), torch.cat(agree).float().mean().item(), count


def greedy(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def main() -> None:
    t0 = time.perf_counter()
    base = EngineConfig(device="cpu", max_model_len=1024, enable_prefix_caching=False)
    llm = LLM.from_pretrained(MODEL_DIR, base, dtype=torch.float32)
    tok = llm.tokenizer
    chunks = heldout_chunks(tok)
    prompts = [tok(p).input_ids for p in PROMPTS]
    ref_lp, ref_ppl, _, _, positions = evaluate(llm, chunks)
    ref_greedy = greedy(llm, prompts)
    llm.calibration, calib_info = calibration_set(tok)
    only = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else None  # e.g. "awq,gptq": merged into the record
    rows = {"float32": dict(heldout_ppl=ref_ppl, weight_bytes=llm.engine.stats().weight_bytes,
                            kv_bytes_per_token=llm.engine.stats().kv_bytes_per_token)}
    print(f"float32: ppl {ref_ppl:.3f} over {positions} positions")
    for name, mode in MODES.items():
        if only is not None and name not in only:
            continue
        t1 = time.perf_counter()
        if mode == "fp8":
            llm.reconfigure(base)
            for lname, _ in linears_to_quantize(llm.model):
                parent, _, attr = lname.rpartition(".")
                owner = llm.model.get_submodule(parent) if parent else llm.model
                setattr(owner, attr, Fp8Emulated(getattr(owner, attr)))
        else:
            llm.reconfigure(base.replace(**mode))
        _, ppl, kl, top1, _ = evaluate(llm, chunks, ref_lp)
        gen = greedy(llm, prompts)
        same = sum(a == b for x, y in zip(gen, ref_greedy) for a, b in zip(x, y)) / sum(map(len, gen))
        first = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                    for x, y in zip(gen, ref_greedy)) / len(gen)
        st = llm.engine.stats()
        rows[name] = dict(heldout_ppl=ppl, ppl_change=ppl / ref_ppl - 1, mean_kl=kl, top1_agreement=top1,
                          greedy_agreement=same, greedy_first_difference_mean=first,
                          weight_bytes=st.weight_bytes if mode != "fp8" else None,
                          kv_bytes_per_token=st.kv_bytes_per_token, seconds=time.perf_counter() - t1)
        print(f"{name:<16} ppl {ppl:.3f} ({100 * (ppl / ref_ppl - 1):+.2f}%)  KL {kl:.2e}  top1 {top1:.4f}  "
              f"greedy {same:.3f} (first diff {first:.1f})  {time.perf_counter() - t1:.0f}s", flush=True)
        if mode == "fp8":
            llm.reconfigure(base.replace(quantization="int8"))  # drop the emulated modules: rebuild on the next mode
        record(rows, only, calib_info, positions, t0)
    record(rows, only, calib_info, positions, t0)


def record(rows: dict, only: set | None, calib_info: dict, positions: int, t0: float) -> None:
    """Write the rows measured so far: the whole file for a full run; for a run of some modes, those
    rows merged into the recorded file, with the run listed under "runs" (its command, modes, date)."""
    out = ROOT / "data" / "benchmarks" / "quant_quality.json"
    command = "PYTHONPATH=. python3 benchmarks/quality_quant.py" + (f" {','.join(sorted(only))}" if only else "")
    run = {"command": command, "modes": sorted(rows), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "python": platform.python_version(), "seconds": time.perf_counter() - t0}
    if only is None or not out.exists():
        result = {"command": command, "model": MODEL_DIR.name, "device": "cpu", "torch": torch.__version__,
                  "python": platform.python_version(), "positions": positions,
                  "greedy_tokens": GREEDY_TOKENS * len(PROMPTS), "modes": {}, "runs": []}
    else:
        result = json.loads(out.read_text())
        if "runs" not in result:  # the record of a full run from before runs were listed
            result["runs"] = [{"command": result["command"], "modes": sorted(result["modes"]),
                               "torch": result.get("torch"), "python": result.get("python"),
                               "seconds": result.get("seconds")}]
    result["targets"] = {"int8_ppl_change_max": 0.01, "fp8_ppl_change_max": 0.01, "int4_ppl_change_max": 0.05,
                         "awq_ppl_change_max": "below int4's", "gptq_ppl_change_max": "below int4's",
                         "awq_gptq_ppl_change_goal": 0.01}
    result["calibration"] = calib_info
    result["modes"].update(rows)
    result["runs"] = [r for r in result.get("runs", []) if r["command"] != command] + [run]
    result["seconds"] = run["seconds"] if only is None else result.get("seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out.relative_to(ROOT)} ({', '.join(sorted(rows))}) after {run['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
