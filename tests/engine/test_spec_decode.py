"""Speculative decoding: greedy output identical to non-speculative decoding (n-gram, draft model and synthetic
proposals, k in {1, 3, 5}) under continuous batching, chunked prefill, prefix caching and preemption; the KV
slots of rejected tokens go back to the pool; rejection sampling keeps the target distribution (chi-square);
counters and config errors."""
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from engine import LLM, EngineConfig, SamplingParams
from engine.spec_decode import Draft, DraftModelProposer, NgramProposer, rejection_sample
from engine.spec_decode.ngram import lookup

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
# Repetitive prompts, so that prompt lookup finds n-grams; a shared 8-token prefix for the prefix cache.
PREFIX = [7, 8, 9, 10, 7, 8, 9, 10]
PROMPTS = [PREFIX + [11, 12], [5, 6, 5, 6, 5], PREFIX + [13], list(range(20, 45)), [3, 3, 3, 3], PREFIX * 2 + [4]]


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over bins with expected count >= 5 (the rest pooled)."""
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double()
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def run_step_api(llm, prompts, params, check_blocks=True):
    """Continuous batching: requests arrive one per step; checks the KV invariants after every step. Returns
    the token ids per prompt."""
    eng, outs, pending = llm.engine, {}, list(enumerate(prompts))
    while pending or eng.has_unfinished_requests():
        if pending:
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", p, params)
        for o in eng.step():
            outs[o.request_id] = o.token_ids
        if check_blocks:
            check_kv_invariants(llm)
    return [outs[f"r{i}"] for i in range(len(prompts))]


def check_kv_invariants(llm):
    """Each block's ref count equals the tables holding it; a running request holds exactly the blocks its
    computed tokens need (the slots of rejected draft tokens were released)."""
    eng = llm.engine
    state = eng.block_map()
    holders = [0] * len(state["blocks"])
    for ids in state["block_tables"].values():
        for b in ids:
            holders[b] += 1
    assert [ref for ref, _ in state["blocks"]] == holders
    for req in eng.scheduler.running:
        assert len(eng.kv.block_ids(req.request_id)) == eng.kv.blocks_needed(req.num_computed_tokens)


def assert_pool_empty(llm):
    st = llm.engine.stats()
    assert st.num_used_blocks == 0 and all(ref == 0 for ref, _ in llm.engine.block_map()["blocks"])


@pytest.fixture(scope="module")
def tiny():
    return LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, block_size=4), seed=3)


def cfg(**kw):
    base = dict(device="cpu", max_model_len=64, block_size=4)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def tiny_refs(tiny):
    tiny.reconfigure(cfg())
    return [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)]


def test_ngram_lookup():
    assert lookup([1, 2, 3, 9, 1, 2, 3], 3, 1, 3) == [9, 1, 2]
    assert lookup([1, 2, 5, 1, 2, 6, 1, 2], 2, 1, 3) == [6, 1]  # the most recent occurrence wins
    assert lookup([1, 2, 3, 4], 3, 1, 3) == []
    assert lookup([4, 4], 5, 1, 3) == [4]


def test_ngram_lookup_matches_a_plain_scan():
    """The vectorised lookup against the definition: scan n from max_n down, occurrences right to left."""
    def scan(tokens, k, min_n, max_n):
        L = len(tokens)
        for n in range(min(max_n, L - 1), min_n - 1, -1):
            for start in range(L - n - 1, -1, -1):
                if tokens[start:start + n] == tokens[L - n:]:
                    return tokens[start + n:start + n + k]
        return []
    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randrange(rng.randint(1, 6)) for _ in range(rng.randint(0, 30))]
        k, min_n = rng.randint(1, 5), rng.randint(1, 3)
        max_n = rng.randint(min_n, 4)
        assert lookup(tokens, k, min_n, max_n) == scan(tokens, k, min_n, max_n)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ngram_greedy_identical_with_batching_chunking_caching_preemption(tiny, tiny_refs, k):
    # 16 blocks of 4 tokens for 6 requests of up to 45 tokens: preemption is certain; 16-token budget: chunked.
    tiny.reconfigure(cfg(speculative_method="ngram", num_speculative_tokens=k, num_gpu_blocks=16,
                         max_num_batched_tokens=16, enable_prefix_caching=True))
    assert run_step_api(tiny, PROMPTS, GREEDY) == tiny_refs
    st = tiny.engine.stats()
    spec = st.spec_decode
    assert st.num_preemptions > 0 and st.prefix_cache_hits > 0
    assert spec.num_draft_tokens > 0 and 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert 1 <= len(spec.accepted_per_position) <= k
    assert sum(s.num_draft_tokens for s in st.steps) == spec.num_draft_tokens
    assert sum(s.num_accepted_tokens for s in st.steps) == spec.num_accepted_tokens
    # Every token emitted is counted: prompts' outputs, once each.
    assert st.num_generation_tokens == len(PROMPTS) * GREEDY.max_tokens
    assert_pool_empty(tiny)


def test_ngram_generate_without_caching_and_stop_tokens(tiny, tiny_refs):
    # A stop token inside an accepted run ends the request there; nothing after it is emitted.
    stop = tiny_refs[1][6]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
    tiny.reconfigure(cfg())
    expected = [o.token_ids for o in tiny.generate(PROMPTS, params)]
    tiny.reconfigure(cfg(speculative_method="ngram", num_speculative_tokens=3, enable_prefix_caching=False))
    assert [o.token_ids for o in tiny.generate(PROMPTS, params)] == expected
    assert_pool_empty(tiny)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_model_greedy_identical(tiny, tiny_refs, k):
    # A random draft of another seed: few acceptances, but verification must still give the target's tokens.
    tiny.reconfigure(cfg(speculative_method="draft", speculative_model="tiny", num_speculative_tokens=k,
                         num_gpu_blocks=16, max_num_batched_tokens=16))
    assert run_step_api(tiny, PROMPTS, GREEDY) == tiny_refs
    spec = tiny.engine.stats().spec_decode
    assert spec.method == "draft" and spec.num_drafts > 0 and spec.draft_time > 0
    assert_pool_empty(tiny)


def test_shipped_model_drafting_for_itself_accepts_everything():
    """The shipped model as its own draft: the draft's greedy tokens are the target's, so (float32, same
    kernels) every proposal is accepted and each verification emits k + 1 tokens."""
    prompts = [[1, 100, 200, 300], [1, 42, 43]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm = LLM.from_pretrained(MODEL_DIR, cfg(max_model_len=256, block_size=16), dtype=torch.float32)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    llm.reconfigure(cfg(max_model_len=256, block_size=16, speculative_method="draft",
                        speculative_model=str(MODEL_DIR), num_speculative_tokens=3))
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    spec = llm.engine.stats().spec_decode
    assert spec.acceptance_rate > 0.9 and spec.mean_accepted_length > 3.5
    assert_pool_empty(llm)


def test_synthetic_acceptance(tiny, tiny_refs):
    # Acceptance 1 with the recorded greedy tokens: every proposal accepted, output still the target's.
    tiny.reconfigure(cfg(speculative_method="synthetic", speculative_acceptance=1.0, num_speculative_tokens=4))
    outs_ref = [type("O", (), {"prompt_token_ids": p, "token_ids": t})() for p, t in zip(PROMPTS, tiny_refs)]
    tiny.engine.proposer.record(outs_ref)
    assert [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)] == tiny_refs
    assert tiny.engine.stats().spec_decode.acceptance_rate == 1.0
    # Acceptance 0.6: the per-position acceptance (given the previous were accepted) is the chosen one.
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    tiny.reconfigure(cfg(speculative_method="synthetic", speculative_acceptance=0.6, num_speculative_tokens=4))
    tiny.generate([[i, i + 1] for i in range(30)], params)
    spec = tiny.engine.stats().spec_decode
    assert spec.method == "synthetic"
    assert spec.num_drafts > 200
    # Position i is reached by drafts whose earlier positions were all accepted: P(accept) = 0.6 at each.
    reached = [spec.num_drafts] + spec.accepted_per_position[:-1]
    for acc, n in zip(spec.accepted_per_position, reached):
        assert abs(acc / n - 0.6) < 4 * (0.24 / n) ** 0.5
    assert abs(spec.per_token_acceptance - 0.6) < 0.05
    assert_pool_empty(tiny)


@pytest.mark.parametrize("deterministic", [True, False])
def test_rejection_sampler_keeps_target_distribution(deterministic):
    """Direct test of the verifier on a vocabulary of 6: the first emitted token is distributed as p[0],
    and, when the first draft token was accepted, the second as p[1]."""
    torch.manual_seed(0)
    V, k, N = 6, 2, 12000
    p = torch.softmax(torch.randn(k + 1, V) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V) * 1.5, -1)
    gen = torch.Generator().manual_seed(1)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        draft = torch.multinomial(q, 1, generator=gen).squeeze(1).tolist()
        if deterministic:
            draft = [2, 4]
        out = rejection_sample(p, draft, None if deterministic else q, gen)
        assert 1 <= len(out) <= k + 1
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chi2_pvalue(first, N * p[0]) > 1e-3
    assert chi2_pvalue(second, second.sum() * p[1]) > 1e-3


def small_vocab_model(seed=5, **kw):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=8, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    return LLM.random(config, cfg(max_model_len=64, block_size=4, **kw), seed=seed)


def test_sampled_tokens_match_target_distribution_in_engine():
    """Engine level, vocabulary 8, temperature 0.9 + top_k 6: over 2400 seeds, the second and third output tokens
    (the ones a verification step emits: a draft token or the correction, then the bonus) follow the exact
    distribution computed from the target's logits; the non-speculative engine is checked the same way."""
    llm = small_vocab_model()
    prompt = list(range(8)) * 2  # every token recurs: prompt lookup always proposes
    n, t, top_k = 2400, 0.9, 6
    params = [SamplingParams(max_tokens=3, temperature=t, top_k=top_k, ignore_eos=True, seed=s) for s in range(n)]

    def probs(ids):
        logits = llm.prompt_logits(ids)[-1] / t
        kth = torch.topk(logits, top_k).values[-1]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    # Exact marginals of the second and third output tokens: sums over the earlier ones.
    p0 = probs(prompt)
    p1_given = {a: probs(prompt + [a]) for a in range(8)}
    p1 = sum(p0[a] * p1_given[a] for a in range(8))
    p2 = sum(p0[a] * p1_given[a][b] * probs(prompt + [a, b]) for a in range(8) for b in range(8)
             if p0[a] > 0 and p1_given[a][b] > 0)
    for method in (None, "ngram"):
        llm.reconfigure(cfg(max_model_len=64, block_size=4, speculative_method=method, num_speculative_tokens=2,
                            max_num_seqs=256))
        outs = llm.generate([prompt] * n, params)
        for i, p in ((1, p1), (2, p2)):
            counts = torch.bincount(torch.tensor([o.token_ids[i] for o in outs]), minlength=8).double()
            assert chi2_pvalue(counts, n * p) > 1e-3, (method, i)
        if method:
            spec = llm.engine.stats().spec_decode
            assert spec.num_drafts == n and 0.05 * n < spec.num_accepted_tokens < 0.95 * n
            assert_pool_empty(llm)


@pytest.mark.parametrize("kw, field", [
    (dict(speculative_method="medusa"), "speculative_method"),
    (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative_method="draft"), "speculative_model"),
    (dict(speculative_method="synthetic", speculative_acceptance=1.5), "speculative_acceptance"),
    (dict(speculative_method="ngram", tensor_parallel_size=2), "tensor_parallel_size"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kw)


def test_draft_with_another_vocabulary_is_rejected_and_engine_stays_usable(tiny, tiny_refs):
    tiny.reconfigure(cfg())
    with pytest.raises(ValueError, match="vocab"):
        tiny.reconfigure(cfg(speculative_method="draft", speculative_model=str(MODEL_DIR)))
    assert [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)] == tiny_refs


def test_proposer_protocol_draft_truncate():
    d = Draft([1, 2, 3], forced=[True, False, True])
    assert d.truncate(2).token_ids == [1, 2] and d.truncate(2).forced == [True, False]
    assert NgramProposer().propose([], []) == {}


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_backend_verification_matches_torch_backend(tiny_refs):
    """Verification steps (1 + k query tokens over cached context) through the Triton prefill kernel."""
    llm = LLM.random("tiny", cfg(attention_backend="triton", speculative_method="ngram", num_speculative_tokens=3,
                                 max_num_batched_tokens=16), seed=3)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == tiny_refs[:3]
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_interrupted_verification_step_is_rolled_back(tiny, tiny_refs, method):
    """A KeyboardInterrupt in the target's forward pass of a verification step (or in the draft's): the step
    is rolled back, the requests are recomputed, and the outputs are still the non-speculative ones."""
    tiny.reconfigure(cfg(speculative_method=method, speculative_model="tiny" if method == "draft" else None,
                         num_speculative_tokens=3))
    eng = tiny.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, GREEDY)
    model = tiny.model if method == "ngram" else tiny._draft.model
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt

    handle = model.layers[0].register_forward_pre_hook(hook)
    outs, interrupted = {}, 0
    try:
        while eng.has_unfinished_requests():
            try:
                for o in eng.step():
                    outs[o.request_id] = o.token_ids
            except KeyboardInterrupt:
                interrupted += 1
            check_kv_invariants(tiny)
    finally:
        handle.remove()
    assert interrupted == 1
    assert [outs[f"r{i}"] for i in range(len(PROMPTS))] == tiny_refs
    assert_pool_empty(tiny)
    if method == "draft":
        assert not tiny._draft.engine.has_unfinished_requests()


def test_seeded_sampling_with_draft_is_reproducible(tiny):
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True) for s in range(6)]
    tiny.reconfigure(cfg(speculative_method="draft", speculative_model="tiny", num_speculative_tokens=2))
    first = [o.token_ids for o in tiny.generate(PROMPTS, params)]
    assert [o.token_ids for o in tiny.generate(PROMPTS, params)] == first
    assert tiny.engine.stats().spec_decode.num_drafts > 0
    assert_pool_empty(tiny)


class EagerGraph:
    """Stands in for a captured verification graph on the CPU: replay() runs what the graph would, over the
    padded input buffers (size rows of k + 1 tokens) into the runner's graph_hidden."""

    def __init__(self, runner, size, query_len):
        self.runner, self.size, self.q = runner, size, query_len
        self.replays = 0

    def replay(self):
        r, t = self.runner, self.size * self.q
        b = r.buffers
        meta = r._metadata(t, self.size, r.max_blocks_per_seq, 0, self.q, r.config.max_model_len)
        r.graph_hidden[:t].copy_(r.model(b.ids_dev[:t], b.pos_dev[:t], r.kv_caches, meta, r.backend))
        self.replays += 1


@pytest.mark.parametrize("k", [1, 3])
def test_verification_graph_padding_gives_the_same_tokens(tiny, tiny_refs, k):
    """Steps where every request verifies a full draft replay a verification graph padded to the next size up
    (padding rows of k + 1 dummy tokens into the null block); the tokens must be the non-speculative ones."""
    tiny.reconfigure(cfg(speculative_method="synthetic", speculative_acceptance=0.7, num_speculative_tokens=k,
                         max_num_seqs=8))
    runner = tiny.engine.runner
    q = k + 1
    assert runner.spec_query_len == q and runner.spec_graph_sizes == [1, 2, 4, 8]
    runner.graph_hidden = torch.empty(8 * q, tiny.spec.hidden_size)
    runner.spec_graphs = {s: (EagerGraph(runner, s, q), runner.graph_hidden[:s * q]) for s in runner.spec_graph_sizes}
    outs_ref = [type("O", (), {"prompt_token_ids": p, "token_ids": t})() for p, t in zip(PROMPTS, tiny_refs)]
    tiny.engine.proposer.record(outs_ref)
    assert [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)] == tiny_refs
    steps = tiny.engine.stats().steps
    graph_steps = [s for s in steps if s.cuda_graph]
    assert graph_steps and all(s.num_draft_tokens > 0 for s in graph_steps)
    assert any(s.num_padding_tokens > 0 for s in graph_steps)  # 6 or 5 or 3 requests: padded to 8 or 4
    assert sum(g.replays for g, _ in runner.spec_graphs.values()) == len(graph_steps)
    assert_pool_empty(tiny)


class EagerDecodeGraph:
    """Stands in for a captured decode graph of the draft's runner on the CPU: replay() runs a decode step of
    `size` rows over the runner's device input buffers (what the graph reads) into its graph_hidden."""

    def __init__(self, runner, size):
        self.runner, self.size = runner, size
        self.replays = 0

    def replay(self):
        from engine.kernels import AttentionMetadata
        r, n = self.runner, self.size
        b = r.buffers
        meta = AttentionMetadata(
            slot_mapping=b.slots_dev[:n], query_start_loc=b.qsl_dev[:n + 1], seq_lens=b.lens_dev[:n],
            block_tables=b.tables_dev[:n, :r.max_blocks_per_seq], num_decodes=n, max_query_len=1,
            max_seq_len=r.config.max_model_len, query_start_loc_cpu=b.qsl_dev[:n + 1].tolist(),
            seq_lens_cpu=b.lens_dev[:n].tolist())
        r.graph_hidden[:n].copy_(r.model(b.ids_dev[:n], b.pos_dev[:n], r.kv_caches, meta, r.backend))
        self.replays += 1


def install_draft_graphs(llm):
    runner = llm._draft.engine.runner
    runner.graph_hidden = torch.empty(runner.graph_sizes[-1], runner.spec.hidden_size)
    runner.graphs = {s: (EagerDecodeGraph(runner, s), runner.graph_hidden[:s]) for s in runner.graph_sizes}
    return runner


def test_draft_proposals_through_decode_graphs_keep_the_draft_exact():
    """The shipped model drafting for itself with the draft's decode steps as (stand-in) graph replays: each
    proposal feeds the one or two unseen tokens and the k - 1 draft tokens as padded one-token replays, tokens
    passed on without a host sync; the draft still agrees with the target on every token (so its K/V, reused
    across steps and overwritten after rejections, is right), and one read-back per proposal."""
    prompts = [[1, 100, 200, 300], [1, 42, 43], [1, 7, 8, 9, 10, 11, 12]]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    llm = LLM.from_pretrained(MODEL_DIR, cfg(max_model_len=256, block_size=16, max_num_seqs=4), dtype=torch.float32)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    llm.reconfigure(cfg(max_model_len=256, block_size=16, max_num_seqs=4, speculative_method="draft",
                        speculative_model=str(MODEL_DIR), num_speculative_tokens=3))
    runner = install_draft_graphs(llm)
    proposer = llm.engine.proposer
    calls = {"n": 0}
    tolist = torch.Tensor.tolist

    def counting_tolist(self, *a):
        calls["n"] += 1
        return tolist(self, *a)

    prop = proposer.propose
    per_proposal = []

    def replays():
        return sum(g.replays for g, _ in runner.graphs.values())

    def propose(reqs, limits):
        calls["n"], before = 0, replays()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "tolist", counting_tolist)
            out = prop(reqs, limits)
        per_proposal.append((calls["n"], replays() - before))
        return out

    proposer.propose = propose
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    spec = llm.engine.stats().spec_decode
    assert spec.acceptance_rate > 0.9 and spec.mean_accepted_length > 3.5
    assert replays() > 0 and runner.graphs[4][0].replays > 0  # 3 requests: padded to 4
    # Every proposal after the first (the prompts, fed eagerly) is graph replays only: one per fed token and k - 1
    # more. The stand-in graph reads its buffers with 2 tolist() per replay (on the CPU only); the proposer itself
    # reads back once per proposal.
    assert all(calls - 2 * n == 1 for calls, n in per_proposal)
    assert all(n >= 3 for _, n in per_proposal[1:])
    assert not proposer.seqs and llm._draft.engine.kv.num_used_blocks == 0  # released with their requests
    assert_pool_empty(llm)


def test_draft_sequences_persist_and_feed_only_unseen_tokens(tiny, tiny_refs):
    """The draft keeps one sequence per running request across steps: after the first proposal (the prompt) each
    proposal feeds the draft the one or two target tokens it has not seen (a correction, or a bonus after
    all k were accepted), not the request's tail; the draft's pool is empty once the requests finish."""
    tiny.reconfigure(cfg(speculative_method="draft", speculative_model="tiny", num_speculative_tokens=3))
    proposer = tiny.engine.proposer
    feeds = []
    admit = proposer._admit

    def spy(requests, k):
        batch = admit(requests, k)
        feeds.extend(q for _, _, q in batch)
        return batch

    proposer._admit = spy
    eng = tiny.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, GREEDY)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o.token_ids
    assert [outs[f"r{i}"] for i in range(len(PROMPTS))] == tiny_refs
    first = len(PROMPTS)
    assert len(feeds) > 2 * first and all(q in (1, 2) for q in feeds[first:])
    assert not proposer.seqs and tiny._draft.engine.kv.num_used_blocks == 0
    assert_pool_empty(tiny)


def test_draft_prefill_in_rounds_of_the_token_budget():
    """A draft's first proposal for a prompt longer than max_num_batched_tokens feeds it in rounds of at most
    that many tokens (its activation memory was sized for them); the shipped model drafting for itself still
    proposes the target's own tokens."""
    prompts = [list(range(100, 121)), [1, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    base = dict(max_model_len=128, block_size=4, max_num_batched_tokens=8)
    llm = LLM.from_pretrained(MODEL_DIR, cfg(**base), dtype=torch.float32)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    llm.reconfigure(cfg(**base, speculative_method="draft", speculative_model=str(MODEL_DIR),
                        num_speculative_tokens=3))
    runner = llm._draft.engine.runner
    sizes = []
    hook = runner.model.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    hook.remove()
    assert max(sizes) == 8 and llm.engine.stats().spec_decode.acceptance_rate > 0.9


def test_synthetic_acceptance_charges_a_draft_that_feeds_like_a_real_one(tiny, tiny_refs):
    """Synthetic acceptance with a cost draft (as benchmarks/spec_bench.py runs it): the draft runs every step
    through its (stand-in) decode graphs, and since it is told it proposed the study's tokens it feeds one or
    two tokens per proposal, as a draft with that acceptance would; the outputs are still the recorded ones."""
    tiny.reconfigure(cfg(speculative_method="synthetic", speculative_acceptance=0.7, num_speculative_tokens=3,
                         speculative_model="tiny", max_num_seqs=8))
    runner = install_draft_graphs(tiny)
    outs_ref = [type("O", (), {"prompt_token_ids": p, "token_ids": t})() for p, t in zip(PROMPTS, tiny_refs)]
    proposer = tiny.engine.proposer
    proposer.record(outs_ref)
    draft = proposer.cost_proposer
    feeds, admit = [], draft._admit

    def spy(requests, k):
        batch = admit(requests, k)
        feeds.append([q for _, _, q in batch])
        return batch

    draft._admit = spy
    assert [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)] == tiny_refs
    assert sum(g.replays for g, _ in runner.graphs.values()) >= 2 * len(feeds)
    later = [q for step in feeds[1:] for q in step]
    assert later and max(later) <= 2 and sum(q == 2 for q in later) < len(later)
    assert not draft.seqs and tiny._draft.engine.kv.num_used_blocks == 0
    assert_pool_empty(tiny)


DRAFT_DIR = MODEL_DIR.parent / "pystdlib-llama-1m-draft"


def test_shipped_draft_proposes_for_the_shipped_model():
    """The shipped draft (0.9M parameters, the target's tokenizer) on held-out Python: the output is the target's,
    and its acceptance is a real draft's, well above a random model's and below the target drafting for itself
    (recorded with benchmarks/spec_bench.py --real in data/benchmarks/spec_decode_cpu_draft.json: about 0.37)."""
    import json
    assert (DRAFT_DIR / "tokenizer.json").read_bytes() == (MODEL_DIR / "tokenizer.json").read_bytes()
    base = dict(max_model_len=256, block_size=16)
    llm = LLM.from_pretrained(MODEL_DIR, cfg(**base), dtype=torch.float32)
    text = json.loads((MODEL_DIR / "heldout.json").read_text())["files"][0]["text"]
    ids = llm.tokenizer.encode(text)
    prompts = [ids[i:i + 64] for i in range(0, 4 * 64, 64)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    llm.reconfigure(cfg(**base, speculative_method="draft", speculative_model=str(DRAFT_DIR),
                        num_speculative_tokens=3))
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    spec = llm.engine.stats().spec_decode
    assert 0.15 < spec.per_token_acceptance < 0.9, spec.per_token_acceptance


def test_sampled_drafts_keep_target_distribution_in_engine():
    """Engine level, vocabulary 8, temperature 0.9 + top_k 6 + top_p 0.95, k = 2: a draft model of other random
    weights (its distribution q differs from the target's p) samples its drafts from q; over 3000 seeds the joint
    distribution of the second and third output tokens (the ones a verification emits: accepted draft tokens,
    the correction from norm(max(0, p - q)), the bonus) is the exact one computed from the target's logits, and
    the drafts carry q (rows summing to 1, the drafted token inside the filter)."""
    llm = small_vocab_model()
    draft = small_vocab_model(seed=11, max_num_seqs=256, num_gpu_blocks=2048)
    prompt = list(range(8)) * 2
    n, t, top_k, top_p = 3000, 0.9, 6, 0.95
    params = [SamplingParams(max_tokens=3, temperature=t, top_k=top_k, top_p=top_p, ignore_eos=True, seed=s)
              for s in range(n)]

    def probs(model, ids):
        row = model.prompt_logits(ids)[-1] / t
        kth = torch.topk(row, top_k).values[-1]
        pr = row.masked_fill(row < kth, float("-inf")).softmax(-1)
        order = pr.argsort(descending=True)
        keep = torch.zeros(8, dtype=torch.bool)
        mass = 0.0
        for tok in order.tolist():  # top-p: keep while the mass before the token is < top_p
            if mass < top_p and pr[tok] > 0:
                keep[tok] = True
            mass += pr[tok].item()
        return pr.masked_fill(~keep, 0.0) / pr[keep].sum()

    # The draft's q differs from the target's p (else the test would not exercise the residual).
    assert (probs(llm, prompt) - probs(draft, prompt)).abs().sum() > 0.3
    p0 = probs(llm, prompt)
    # Joint of output tokens 1 and 2: sum over output token 0.
    joint = torch.zeros(8, 8, dtype=torch.float64)
    for a in range(8):
        if p0[a] == 0:
            continue
        pa = probs(llm, prompt + [a])
        for b in range(8):
            if pa[b] > 0:
                joint[b] += (p0[a] * pa[b]).double() * probs(llm, prompt + [a, b]).double()
    assert abs(joint.sum().item() - 1) < 1e-5
    llm.reconfigure(cfg(max_model_len=64, block_size=4, speculative_method="ngram", num_speculative_tokens=2,
                        max_num_seqs=256))
    proposer = DraftModelProposer(draft.engine)
    seen = []
    propose = proposer.propose

    def checking_propose(reqs, limits):
        out = propose(reqs, limits)
        for d in out.values():
            assert d.probs is not None and d.probs.shape == (len(d), 8)
            assert torch.allclose(d.probs.sum(-1), torch.ones(len(d)))
            assert all(d.probs[i, tok] > 0 for i, tok in enumerate(d.token_ids))
            seen.append(len(d))
        return out

    proposer.propose = checking_propose
    llm.engine.set_proposer(proposer)
    outs = llm.generate([prompt] * n, params)
    pairs = torch.tensor([o.token_ids[1] * 8 + o.token_ids[2] for o in outs])
    counts = torch.bincount(pairs, minlength=64).double()
    assert chi2_pvalue(counts, n * joint.flatten()) > 1e-3
    spec = llm.engine.stats().spec_decode
    assert spec.method == "draft" and len(seen) >= spec.num_drafts > 0.9 * n
    # The first draft token (drawn from q at prompt + [a], a the first output token) is accepted with probability
    # sum_x min(p(x), q(x)): the speculative-sampling rate, which greedy drafts or a verifier ignoring q miss.
    rate = sum(p0[a].item() * torch.minimum(probs(llm, prompt + [a]), probs(draft, prompt + [a])).sum().item()
               for a in range(8) if p0[a] > 0)
    got = spec.accepted_per_position[0] / spec.num_drafts
    assert abs(got - rate) < 4 * (rate * (1 - rate) / spec.num_drafts) ** 0.5, (got, rate)
    assert_pool_empty(llm)


def test_sampled_drafts_of_the_target_itself_are_almost_always_accepted():
    """The shipped model drafting for itself at temperature 0.8: q equals p (up to float32 rounding), so almost
    every sampled draft token is accepted (min(1, p / q) = 1); greedy drafts would be rejected whenever the target
    samples a token other than its argmax."""
    prompts = [[1, 100, 200, 300], [1, 42, 43]]
    params = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=s, ignore_eos=True) for s in range(2)]
    llm = LLM.from_pretrained(MODEL_DIR, cfg(max_model_len=256, block_size=16, speculative_method="draft",
                                             speculative_model=str(MODEL_DIR), num_speculative_tokens=3),
                              dtype=torch.float32)
    llm.generate(prompts, params)
    spec = llm.engine.stats().spec_decode
    assert spec.num_drafts > 0 and spec.acceptance_rate > 0.95
    assert_pool_empty(llm)


def test_one_hot_q_reduces_to_the_deterministic_rule():
    """A draft whose q is a point mass on its token (greedy, n-gram) goes through the same rule: accept with
    probability p(d), at a rejection draw from norm(max(0, p - onehot(d))) = p without d: the same tokens as the
    deterministic path (q None) for the same random stream."""
    torch.manual_seed(2)
    V, k = 7, 3
    for trial in range(300):
        p = torch.softmax(torch.randn(k + 1, V) * 2, -1)
        draft = torch.randint(0, V, (k,)).tolist()
        onehot = torch.nn.functional.one_hot(torch.tensor(draft), V).float()
        a = rejection_sample(p, draft, None, torch.Generator().manual_seed(trial))
        b = rejection_sample(p, draft, onehot, torch.Generator().manual_seed(trial))
        assert a == b


def test_mixed_batch_greedy_requests_keep_greedy_drafts_and_outputs(tiny, tiny_refs):
    """Greedy and sampling requests in one batch with a draft model: greedy requests get point-mass drafts (probs
    None) and the non-speculative greedy tokens; sampling requests get drafts with q rows."""
    tiny.reconfigure(cfg(speculative_method="draft", speculative_model="tiny", num_speculative_tokens=3))
    proposer = tiny.engine.proposer
    propose, kinds = proposer.propose, {}

    def recording(reqs, limits):
        out = propose(reqs, limits)
        for r in reqs:
            if r.request_id in out:
                kinds.setdefault(r.params.greedy, set()).add(out[r.request_id].probs is None)
        return out

    proposer.propose = recording
    sampled = SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=1, ignore_eos=True)
    params = [GREEDY if i % 2 == 0 else sampled for i in range(len(PROMPTS))]
    outs = [o.token_ids for o in tiny.generate(PROMPTS, params)]
    assert [outs[i] for i in range(0, len(PROMPTS), 2)] == [tiny_refs[i] for i in range(0, len(PROMPTS), 2)]
    assert kinds == {True: {True}, False: {False}}
    assert_pool_empty(tiny)


def test_sampled_drafts_through_decode_graphs_read_back_once():
    """Requests that sample, the shipped model drafting for itself through (stand-in) decode-graph replays: the
    drafted tokens are drawn on the device and read back once per proposal (q stays on the device: no other
    tolist or item), and the draft's q matches the target's p closely enough that > 90% of the drafts are accepted
    (its K/V, reused across steps and overwritten after rejections, is right)."""
    prompts = [[1, 100, 200, 300], [1, 42, 43], [1, 7, 8, 9, 10, 11, 12]]
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_k=50, top_p=0.9, seed=s, ignore_eos=True)
              for s in range(3)]
    llm = LLM.from_pretrained(MODEL_DIR, cfg(max_model_len=256, block_size=16, max_num_seqs=4,
                                             speculative_method="draft", speculative_model=str(MODEL_DIR),
                                             num_speculative_tokens=3), dtype=torch.float32)
    runner = install_draft_graphs(llm)
    proposer = llm.engine.proposer
    calls = {"n": 0}
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counting(fn):
        def wrapped(self, *a):
            calls["n"] += 1
            return fn(self, *a)
        return wrapped

    prop, per_proposal = proposer.propose, []

    def replays():
        return sum(g.replays for g, _ in runner.graphs.values())

    def propose(reqs, limits):
        calls["n"], before = 0, replays()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "tolist", counting(tolist))
            mp.setattr(torch.Tensor, "item", counting(item))
            out = prop(reqs, limits)
        per_proposal.append((calls["n"], replays() - before))
        assert all(d.probs is not None for d in out.values())
        return out

    proposer.propose = propose
    llm.generate(prompts, params)
    spec = llm.engine.stats().spec_decode
    assert spec.acceptance_rate > 0.9
    assert all(calls - 2 * n == 1 for calls, n in per_proposal)  # the stand-in graph's 2 tolist per replay
    assert all(n >= 3 for _, n in per_proposal[1:])
    assert_pool_empty(llm)


def test_sampled_drafts_are_bounded_by_their_q_bytes(tiny, monkeypatch):
    """q rows wait on the device outside the memory profile: past SAMPLED_DRAFT_MAX_BYTES a proposal's further
    sampling requests get greedy drafts (probs None), and every request still finishes."""
    import engine.spec_decode.draft_sampling as ds
    k = 3
    vocab = tiny.engine.spec.vocab_size
    monkeypatch.setattr(ds, "SAMPLED_DRAFT_MAX_BYTES", 2 * k * vocab * 4)  # room for the q rows of 2 requests
    tiny.reconfigure(cfg(speculative_method="draft", speculative_model="tiny", num_speculative_tokens=k))
    proposer = tiny.engine.proposer
    propose, counts = proposer.propose, []

    def recording(reqs, limits):
        out = propose(reqs, limits)
        counts.append((max(limits, default=0), sum(d.probs is not None for d in out.values())))
        return out

    proposer.propose = recording
    params = SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=3, ignore_eos=True)
    outs = tiny.generate(PROMPTS, [params] * len(PROMPTS))
    assert all(len(o.token_ids) == 12 for o in outs)
    # A proposal of k tokens holds q rows of k x vocab float32 per sampled draft: never past the bound.
    assert all(n * kk * vocab * 4 <= ds.SAMPLED_DRAFT_MAX_BYTES for kk, n in counts)
    assert len(PROMPTS) > 2 and max(n for kk, n in counts if kk == k) == 2
    assert_pool_empty(tiny)
