"""Independent references for the sampler's tests (CPU and GPU): the filter rule computed token by token in float64,
a chi-square p-value, and a row with ties."""
import math

import torch


def reference_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered softmax of one row, token by token in float64 (the scaled row in float32, as the sampler's).
    top-k keeps the tokens >= the k-th largest value (ties kept); top-p keeps token t iff the renormalized mass of
    the kept tokens strictly above it is < top_p."""
    x = [float(v) for v in row.float() / torch.tensor(temperature, dtype=torch.float32)]
    kept = list(range(len(x)))
    if 1 <= top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        kept = [t for t in kept if x[t] >= kth]
    if top_p < 1:
        m = max(x[t] for t in kept)
        w = {t: math.exp(x[t] - m) for t in kept}
        z = sum(w.values())
        kept = [t for t in kept if sum(w[s] for s in kept if x[s] > x[t]) / z < top_p]
    m = max(x[t] for t in kept)
    probs = torch.zeros(len(x), dtype=torch.float64)
    for t in kept:
        probs[t] = math.exp(x[t] - m)
    return probs / probs.sum()


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square over the bins with expected count > 0 (all >= 5 here), as a p-value."""
    keep = expected > 0
    obs, exp = observed[keep].double(), expected[keep].double()
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item() if dof else 1.0


# A row with ties (1.5 twice, -0.5 twice) so that top-k and top-p cut through tie groups.
ROW = torch.tensor([2.0, 1.5, 1.5, 0.3, 0.0, -0.5, -0.5, -3.0])
