"""Train the small Llama model shipped in data/models/ on the Python standard library's source.

Random weights give random text: fine for timing, useless for judging what prefix caching or
quantization does to outputs. No model hub is reachable, so we train our own from text that every
Python installation ships: the stdlib's `.py` files (source and docstrings).

What it does, in order:

1. Collects the `.py` files under `sysconfig.get_paths()["stdlib"]` (no test packages, no
   site-packages), sorted by relative path, and splits them by index: every 20th file (index % 20 == 0)
   is the held-out test slice, index % 20 == 10 the validation slice (picks the checkpoint), the rest trains.
2. Trains a byte-level BPE tokenizer (HF `tokenizers`, 4096 tokens, specials <unk> <s> </s> <pad>)
   on the training files only.
3. Trains a `LlamaForCausalLM` (grouped-query attention) with AdamW and a cosine schedule, bf16
   autocast on CUDA, on random 512-token windows of the training stream (files joined as <s> text </s>).
4. Saves config, bf16 safetensors and tokenizer, reloads them in float32 and measures held-out
   perplexity on (a) the whole test slice and (b) a fixed subset of it whose text is stored in
   heldout.json, so the recorded number can be checked on any machine, whatever its Python version.
5. Writes eval.json (numbers, command, Python version) and README.md beside the weights.

Held-out perplexity protocol (tests/engine/test_shipped_model.py repeats it): each file becomes
[<s>] + ids + [</s>]; the files' ids are concatenated and cut into consecutive 512-token chunks; within
a chunk every token but the first is predicted; perplexity = exp(mean NLL over predicted tokens).

Shipped run (one H100, about a minute; see data/models/pystdlib-llama-6m/README.md):
    python3 scripts/train_small_model.py --out data/models/pystdlib-llama-6m --eval-every 100 --steps 900 \
        --batch-size 64 --weight-decay 0.3
CPU smoke test (seconds):
    python3 scripts/train_small_model.py --out /tmp/m --device cpu --steps 4 --batch-size 2 --eval-every 2 \
        --max-files 60 --heldout-tokens 2048
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, the Llama convention (bos=1, eos=2)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELDOUT_EVERY = 20          # index % 20 == 0: test slice (reported perplexity)
VALIDATION_OFFSET = 10      # index % 20 == 10: validation slice (checkpoint selection)


# ----------------------------------------------------------------------------------------- data

def stdlib_files(max_files: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's `.py` files, sorted by path; test packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: stay inside the stdlib
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            # _sysconfigdata* is the build machine's generated configuration, not library source.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                paths.append(Path(dirpath, name).relative_to(root).as_posix())
    paths.sort()
    if max_files is not None:
        paths = paths[:max_files]
    return [(p, (root / p).read_text(encoding="utf-8", errors="replace")) for p in paths]


def split_files(files):
    """(train, validation, test) lists of (path, text), split deterministically by sorted index."""
    train, val, test = [], [], []
    for i, f in enumerate(files):
        if i % HELDOUT_EVERY == 0:
            test.append(f)
        elif i % HELDOUT_EVERY == VALIDATION_OFFSET:
            val.append(f)
        else:
            train.append(f)
    return train, val, test


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Concatenated [<s>] + ids + [</s>] of each text (the tokenizers backend encodes in parallel)."""
    out: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        out.append(BOS_ID)
        out.extend(enc.ids)
        out.append(EOS_ID)
    return out


def pick_stored_heldout(tokenizer, test_files, budget_tokens: int, seed: int):
    """Whole test files, in a seeded random order, while their stream fits in budget_tokens."""
    order = list(range(len(test_files)))
    random.Random(seed).shuffle(order)
    lengths = [len(e.ids) + 2 for e in tokenizer.encode_batch([t for _, t in test_files], add_special_tokens=False)]
    chosen, total = [], 0
    for i in order:
        if total + lengths[i] <= budget_tokens:
            chosen.append(i)
            total += lengths[i]
    return [test_files[i] for i in sorted(chosen)]


# ------------------------------------------------------------------------------------ tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` whose post-processor prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID, PAD_ID]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by transformers.AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length)
    hf_tok.save_pretrained(out)
    # Name the class every transformers version knows (v5 may write its new backend's name).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- model

def model_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=args.tie_word_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, attention_bias=False, mlp_bias=False)


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def stream_nll(model, ids: list[int], seq_len: int, device, *, autocast: bool, batch_size: int = 32):
    """(summed NLL in nats, number of predicted tokens) over consecutive seq_len chunks of ids."""
    model.eval()
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    full = [c for c in chunks if len(c) == seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[c] for c in chunks if len(c) < seq_len]
    total, count = 0.0, 0
    for group in groups:
        x = torch.tensor(group, dtype=torch.long, device=device)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total, count


def train(args, model, train_ids: torch.Tensor, val_ids: list[int], device, log):
    """Runs args.steps AdamW steps; returns (history, best validation (step, loss), wall seconds)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    use_autocast = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    window = torch.arange(args.seq_len + 1, device=device)
    history = {"train": [], "val": []}
    best = (None, float("inf"))
    best_state = None
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,), device=device, generator=gen)
        batch = train_ids[starts[:, None] + window]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # A run stopped by --max-train-seconds ends with a validation too, so its last step can be kept.
        out_of_time = bool(args.max_train_seconds) and time.perf_counter() - t0 > args.max_train_seconds
        last = step + 1 == args.steps or out_of_time
        if (step + 1) % args.log_every == 0 or last:
            history["train"].append([step + 1, round(loss.item(), 4)])
            log(f"step {step + 1}/{args.steps} loss {loss.item():.4f} grad_norm {grad_norm.item():.3f} "
                f"lr {lr_at(step, args):.2e} {time.perf_counter() - t0:.1f}s")
        if (step + 1) % args.eval_every == 0 or last:
            nll, n = stream_nll(model, val_ids, args.seq_len, device, autocast=use_autocast)
            val_loss = nll / n
            history["val"].append([step + 1, round(val_loss, 4)])
            log(f"step {step + 1} validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.3f})")
            if val_loss < best[1]:
                best = (step + 1, val_loss)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out_of_time and step + 1 < args.steps:
            log(f"stopping at step {step + 1}: --max-train-seconds {args.max_train_seconds} reached")
            history["stopped_by_time_at_step"] = step + 1
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    model.load_state_dict(best_state)
    return history, best, wall


@torch.no_grad()
def greedy_samples(model, hf_tok, prompts, device, max_new_tokens=48):
    out = {}
    for p in prompts:
        ids = hf_tok(p, return_tensors="pt").input_ids.to(device)
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID)
        out[p] = hf_tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
    return out


# -------------------------------------------------------------------------------------- outputs

def write_readme(out: Path, ev: dict, name: str) -> None:
    a = ev["architecture"]
    t = ev["training"]
    samples = "\n\n".join(f"prompt {p!r}:\n\n```python\n{p}{s}\n```" for p, s in ev["greedy_samples"].items())
    text = f"""# {name}

A {ev['num_parameters'] / 1e6:.1f}M-parameter Llama-architecture causal LM (`LlamaForCausalLM`) trained
from scratch on the source files of the Python {ev['python_version']} standard library, with its own
{a['vocab_size']}-token byte-level BPE tokenizer. It exists so that the workbench has a real model to
serve offline: greedy text looks like Python, so prefix caching, quantization quality and sampling can
be judged by their outputs, not only timed. It is a teaching model, not a code assistant.

| | |
| --- | --- |
| layers | {a['num_hidden_layers']} |
| hidden size | {a['hidden_size']} |
| MLP (SwiGLU) size | {a['intermediate_size']} |
| attention | {a['num_attention_heads']} query heads, {a['num_key_value_heads']} KV heads (grouped-query), head_dim {a['head_dim']} |
| positions | RoPE, theta 10000, max_position_embeddings {a['max_position_embeddings']} |
| vocabulary | {a['vocab_size']} (byte-level BPE; `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3) |
| tied embeddings | {a['tie_word_embeddings']} |
| parameters | {ev['num_parameters']:,} |
| weights | model.safetensors, bfloat16 ({ev['weights_bytes'] / 1e6:.1f} MB) |

## Held-out perplexity

| slice | tokens scored | perplexity |
| --- | --- | --- |
| stored subset (heldout.json) | {ev['heldout_tokens']:,} | **{ev['heldout_ppl']:.3f}** |
| whole test slice ({ev['data']['test_files']} files) | {ev['test_slice_tokens']:,} | {ev['test_slice_ppl']:.3f} |
| validation slice (picked the checkpoint) | {ev['val_tokens']:,} | {ev['val_ppl']:.3f} |

Files are the stdlib's `.py` files (no `test`/`tests`/`idle_test` packages, no site-packages, no
`_sysconfigdata*`), sorted by relative path; index % 20 == 0 is the test slice, index % 20 == 10 the
validation slice, everything else trains (tokenizer included). Each file becomes `<s>` + ids + `</s>`,
the files are concatenated and cut into consecutive 512-token chunks, and every token but a chunk's first is
scored: perplexity = exp(mean NLL). Scored in float32 from the saved bf16 weights. heldout.json stores the
text of the scored subset ({ev['heldout_files']} whole test files, chosen in a seeded random order up to a token
budget), so `tests/engine/test_shipped_model.py` re-checks the number on any machine, whatever its Python.

## Training

{t['steps']} AdamW steps (betas 0.9/0.95, weight decay {t['weight_decay']}, peak lr {t['lr']}, {t['warmup_steps']}
warmup steps, cosine to {t['min_lr_ratio']}x, grad clip {t['grad_clip']}), batch {t['batch_size']} x {t['seq_len']} tokens
of random windows over the {ev['data']['train_tokens']:,}-token training stream ({ev['data']['train_files']} files),
{t['precision']} on {ev['device']}; {t['tokens_seen']:,} tokens seen ({t['epochs']:.1f} epochs) in {t['train_seconds']:.0f} s
of training ({ev['wall_seconds']:.0f} s in all). The checkpoint kept is the one with the lowest validation loss:
step {t['best_step']} of {t['steps']} (validation measured every {t['eval_every']} steps), which had seen
{t['tokens_seen_at_best_step']:,} tokens.

Why so short: the stdlib is only a few million tokens, and this model memorizes it. A 4000-step run at
batch 64 (about 50 epochs) drove the training loss to 0.13 while validation perplexity rose from 17 (step 500)
to 250. So training stops after a handful of epochs. The script's defaults (900 steps, batch 64, weight
decay 0.3) won a five-run sweep on Python 3.12.3 by validation perplexity: 600 or 900 steps at batch 64, 1200
or 1800 at batch 32 (weight decay 0.1) and 900 at batch 64 with weight decay 0.3 all reached 15.4 to 16.0. The
test slice was never used to choose anything.

Reproduce (Python {ev['python_version']}'s stdlib, torch {ev['torch_version']}, transformers {ev['transformers_version']}):

```
{ev['command']}
```

The tokenizer and the split are deterministic for a given stdlib; GPU training is not bit-exact run to
run, so a rerun gives a close but not identical perplexity. Another Python version has another stdlib,
hence other training data.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("data/models/{name}")
model = AutoModelForCausalLM.from_pretrained("data/models/{name}", dtype="float32")

from engine import LLM, EngineConfig, SamplingParams
llm = LLM.from_pretrained("data/models/{name}", EngineConfig(device="cpu"))
```

## Greedy samples (HF generate, 48 new tokens)

{samples}
"""
    (out / "README.md").write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (HF format)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.3)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-train-seconds", type=float, default=420.0,
                   help="safety stop for the training loop (0: none); recorded in eval.json if it fires")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--heldout-tokens", type=int, default=32768,
                   help="token budget of the stored held-out subset (heldout.json)")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (smoke tests)")
    p.add_argument("--tokenizer", default=None,
                   help="reuse this model folder's tokenizer.json instead of training one (a draft model for "
                        "speculative decoding must share its target's vocabulary)")
    p.add_argument("--exclude-heldout-of", default=None,
                   help="a model folder: leave the files of its heldout.json out of training and validation (so "
                        "a draft never saw the text its target is evaluated on)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    t_start = time.perf_counter()
    args = parse_args(argv)
    command = "python3 " + shlex.join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    files = stdlib_files(args.max_files)
    train_files, val_files, test_files = split_files(files)
    if args.exclude_heldout_of:
        held = json.loads((Path(args.exclude_heldout_of) / "heldout.json").read_text())["files"]
        held_paths = {f["path"] for f in held}
        moved = [f for f in train_files + val_files if f[0] in held_paths]
        train_files = [f for f in train_files if f[0] not in held_paths]
        val_files = [f for f in val_files if f[0] not in held_paths]
        log(f"left {len(moved)} files of {args.exclude_heldout_of}/heldout.json out of training and validation")
    corpus_hash = hashlib.sha256()
    for path, text in files:
        corpus_hash.update(path.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0")
    log(f"Python {platform.python_version()} stdlib: {len(files)} files "
        f"({sum(len(t) for _, t in files) / 1e6:.1f} M chars): {len(train_files)} train, {len(val_files)} "
        f"validation, {len(test_files)} test")

    if args.tokenizer:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID, PAD_ID]
    else:
        tok = train_tokenizer([t for _, t in train_files], args.vocab_size)
    save_tokenizer(tok, out, model_max_length=2048)
    log(f"tokenizer: {tok.get_vocab_size()} tokens")
    train_stream = token_stream(tok, [t for _, t in train_files])
    val_ids = token_stream(tok, [t for _, t in val_files])
    test_ids = token_stream(tok, [t for _, t in test_files])
    stored = pick_stored_heldout(tok, test_files, args.heldout_tokens, args.seed)
    stored_ids = token_stream(tok, [t for _, t in stored])
    log(f"tokens: {len(train_stream):,} train, {len(val_ids):,} validation, {len(test_ids):,} test, "
        f"{len(stored_ids):,} in the stored subset ({len(stored)} files)")

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    config = model_config(args, tok.get_vocab_size())
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters on {device}")

    train_ids = torch.tensor(train_stream, dtype=torch.long, device=device)
    history, (best_step, best_val), train_seconds = train(args, model, train_ids, val_ids, device, log)
    steps_done = history.get("stopped_by_time_at_step", args.steps)
    log(f"trained {steps_done} steps in {train_seconds:.1f}s; best validation loss {best_val:.4f} at step {best_step}")

    model.to(torch.bfloat16).save_pretrained(out)
    (out / "heldout.json").write_text(json.dumps({
        "description": "text of the held-out files whose perplexity eval.json records as heldout_ppl",
        "protocol": "each file -> [<s>] + tokenizer(text, add_special_tokens=False) + [</s>]; concatenate; "
                    "consecutive chunks of 512 tokens; score every token but each chunk's first; "
                    "ppl = exp(mean NLL)",
        "python_version": platform.python_version(),
        "seq_len": args.seq_len,
        "files": [{"path": p, "text": t} for p, t in stored],
    }, indent=1) + "\n")

    # Score what was shipped: the bf16 weights read back in float32, full-precision matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    del model
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("x").input_ids[0] == BOS_ID and hf_tok.eos_token_id == EOS_ID
    results = {}
    for name, ids in (("heldout", stored_ids), ("test_slice", test_ids), ("val", val_ids)):
        nll, n = stream_nll(shipped, ids, args.seq_len, device, autocast=False)
        results[name] = (math.exp(nll / n), n)
        log(f"{name}: perplexity {math.exp(nll / n):.4f} over {n:,} tokens")
    samples = greedy_samples(shipped, hf_tok, ["def ", "import os\n", "class Foo(", '"""'], device)
    for p, s in samples.items():
        log(f"greedy {p!r} -> {s!r}")

    weights_bytes = (out / "model.safetensors").stat().st_size
    import tokenizers
    import transformers

    ev = {
        "model": out.name,
        "heldout_ppl": results["heldout"][0],
        "heldout_tokens": results["heldout"][1],
        "heldout_files": len(stored),
        "test_slice_ppl": results["test_slice"][0],
        "test_slice_tokens": results["test_slice"][1],
        "val_ppl": results["val"][0],
        "val_tokens": results["val"][1],
        "num_parameters": n_params,
        "weights_bytes": weights_bytes,
        "architecture": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")},
        "training": {
            "steps": steps_done, "steps_requested": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "tokens_seen": steps_done * args.batch_size * args.seq_len,
            "tokens_seen_at_best_step": best_step * args.batch_size * args.seq_len,
            "epochs": steps_done * args.batch_size * args.seq_len / len(train_stream),
            "lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "eval_every": args.eval_every,
            "seed": args.seed, "best_step": best_step, "best_val_loss": best_val,
            "train_seconds": train_seconds, "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "history": history,
        },
        "data": {
            "source": "sysconfig.get_paths()['stdlib'] *.py, sorted; skipped dirs " + ", ".join(sorted(SKIP_DIRS))
                      + "; skipped _sysconfigdata*",
            "split": "index % 20 == 0 test, index % 20 == 10 validation, else train",
            "files": len(files), "train_files": len(train_files), "val_files": len(val_files),
            "test_files": len(test_files), "train_tokens": len(train_stream), "corpus_sha256": corpus_hash.hexdigest(),
        },
        "wall_seconds": time.perf_counter() - t_start,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "command": command,
        "greedy_samples": samples,
    }
    (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    write_readme(out, ev, out.name)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"wrote {sorted(f.name for f in out.iterdir())} ({total / 1e6:.1f} MB) to {out}")


if __name__ == "__main__":
    main()
