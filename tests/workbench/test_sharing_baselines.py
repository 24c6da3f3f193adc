"""The allocator comparison's sharing cases against block counts computed by hand."""
import pytest

from workbench.sharing_baselines import compare_sharing
from workbench.sharing_figures import allocator_sharing
from workbench import figures


def cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("p, o, b", [(10, 6, 4), (8, 5, 4), (33, 20, 16)])
def test_parallel_sampling_holds_the_full_prompt_blocks_once(p, o, b):
    n = 4
    r = compare_sharing([(p, o), (p, o)], block_size=b, n=n, beam_width=2)
    row = r.summary.set_index("case").loc["parallel"]
    # at the last step every sequence holds p + o tokens
    assert row["unshared"] == 2 * n * cdiv(p + o, b)
    assert row["shared"] == 2 * (p // b + n * (cdiv(p + o, b) - p // b))
    assert row["contiguous"] == 2 * n * (p + o) / b
    assert row["num_cow_copies"] == 2 * (n - 1) * (p % b != 0)  # each fork copies the partial prompt block once
    assert row["saving"] == pytest.approx(1 - row["shared"] / row["unshared"])
    single = r.summary.set_index("case").loc["single"]
    assert single["shared"] == single["unshared"] == 2 * cdiv(p + o, b) and single["saving"] == 0


def test_beam_search_every_step_counts_every_beam_and_shares_at_least_the_prompt():
    p, o, b, w = 10, 12, 4, 4
    r = compare_sharing([(p, o)], block_size=b, beam_width=w, seed=3, cases=("beam",))
    t = r.timeline
    assert len(t) == o
    for step, row in t.iterrows():
        tokens = p + 1 + step
        assert row["unshared"] == w * cdiv(tokens, b)
        assert cdiv(tokens, b) <= row["shared"] <= row["unshared"] - (w - 1) * (p // b)
    row = r.summary.iloc[0]
    assert row["num_cow_copies"] > 0 and 0 < row["saving"] < 1
    assert compare_sharing([(p, o)], block_size=b, beam_width=w, seed=3, cases=("beam",)).summary.equals(r.summary)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n=0 is not allowed"):
        compare_sharing([(4, 4)], n=0)
    with pytest.raises(ValueError, match="beam_width=1.5 is not allowed"):
        compare_sharing([(4, 4)], beam_width=1.5)
    with pytest.raises(ValueError, match="unknown"):
        compare_sharing([(4, 4)], cases=("greedy",))


def test_figure_draws_the_three_allocators_per_case():
    summary = compare_sharing([(10, 6)], block_size=4).summary
    fig = allocator_sharing(summary)
    assert [t.name for t in fig.data] == ["Orca (Oracle), no sharing", "paged, no sharing", "vLLM (paged, shared)"]
    assert list(fig.data[0].y) == [4, 16, 16] and list(fig.data[1].y) == [4, 16, 16]
    assert list(fig.data[2].y)[:2] == [4, 10]  # the beam case depends on the drawn parents
    assert list(fig.data[2].text)[:2] == ["", "-38%"]
    assert figures.is_empty(allocator_sharing(summary.iloc[0:0])) == "no cases to show"
