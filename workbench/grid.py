"""The grid of a sweep: typed points from {EngineConfig field: [values]}, every value checked first.

Besides EngineConfig fields a grid may sweep the workload's sampling (SAMPLING_KEYS): ``n``, completions
per request (parallel sampling: every request's SamplingParams(n=...)), and ``beam_width`` (None: no beam
search; an integer: every request runs as a beam search, BeamSearchParams(beam_width=...)); a point's
``sampling`` holds them and `trace_replay.request_params` routes them to each request.

`build_points` validates the whole grid before anything runs: unknown fields and every invalid value
(and combination) are reported together in one ValueError (one line), and duplicate values are dropped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

from . import schema
from .schema import C


@dataclass(frozen=True)
class Point:
    """One grid point: its key (point_id hashes config, workload, model and sampling), a short label,
    the full EngineConfig, the workload, and the grid values that make it (settings)."""

    point_id: str
    label: str
    config: object  # engine.EngineConfig
    workload: object  # workbench.workloads.Workload
    settings: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # the grid's SAMPLING_KEYS values of this point (n, beam_width)


# Grid keys that are not EngineConfig fields: the workload's sampling, with the rule each value must meet.
SAMPLING_KEYS = {C.n: "an integer >= 1 (completions per request)",
                 C.beam_width: "None (no beam search) or an integer >= 1 (beams per request)"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sampling_value_ok(key: str, v) -> bool:
    if key == C.beam_width and v is None:
        return True
    return _is_int(v) and v >= 1


def sampling_problems(sampling: dict, config) -> list[str]:
    """What is wrong with one point's sampling (n, beam_width, merged with the sweep's ``sampling``) on
    ``config``, found before anything runs: the engine would refuse its requests on any pool."""
    n, beam = sampling.get(C.n, 1), sampling.get(C.beam_width)
    bad = [f"{k}={v!r} is not allowed: {k} must be {SAMPLING_KEYS[k]}" for k, v in ((C.n, n), (C.beam_width, beam))
           if not _sampling_value_ok(k, v)]
    if bad:
        return bad
    size, what = (beam, f"beam_width={beam}") if beam is not None else (n, f"n={n}")
    problems = []
    if beam is not None and n != 1:
        problems.append(f"n={n} with beam_width={beam}: a point is either parallel sampling (n, with "
                        "beam_width=None) or beam search (beam_width, with n=1); sweep them as separate points")
    if size > 1 and config.max_num_seqs is not None and size > config.max_num_seqs:
        problems.append(f"{what} is more than max_num_seqs={config.max_num_seqs}: one request runs {size} "
                        "sequences at once")
    if size > 1 and config.speculative_method is not None:
        problems.append(f"{what} is not combined with speculative decoding (speculative_method="
                        f"{config.speculative_method!r})")
    if size > 1 and config.tensor_parallel_size > 1:
        problems.append(f"{what} needs tensor_parallel_size=1 (block copies are not implemented for tensor "
                        "parallelism)")
    return problems


def _fmt(v) -> str:
    if schema.is_missing(v):
        return "none"
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else str(v)


def point_label(settings: dict) -> str:
    """A short name for the grid values of a point, e.g. "bs=16 prefix=on tokens=2048" ("base" for none)."""
    def short(k):
        col = schema.BY_NAME.get(k)
        return col.short if col is not None and col.short else k

    return " ".join(f"{short(k)}={_fmt(v)}" for k, v in settings.items()) or "base"


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _unique(values) -> list:
    """Values in order without repeats; True and 1 (equal in Python) stay distinct."""
    seen, out = set(), []
    for v in values:
        key = (type(v).__name__, repr(v))
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def normalise_grid(grid: dict | None) -> dict:
    """{field: [values]} with scalars wrapped in a list and duplicate values dropped."""
    return {k: _unique(v if isinstance(v, (list, tuple)) else [v]) for k, v in (grid or {}).items()}


def check_grid(grid: dict, base_config) -> None:
    """Raise one ValueError naming every unknown field and every invalid value of ``grid``."""
    allowed = list(base_config.to_dict())
    problems = [f"{k!r} is not an EngineConfig field (use one of {', '.join(allowed)}) nor a sampling key "
                f"({', '.join(SAMPLING_KEYS)})" for k in grid if k not in allowed and k not in SAMPLING_KEYS]
    for k, values in grid.items():
        if k not in allowed and k not in SAMPLING_KEYS:
            continue
        if not values:
            problems.append(f"{k} has no values")
        if k in SAMPLING_KEYS:
            problems += [f"{k}={v!r} is not allowed: {k} must be {SAMPLING_KEYS[k]}" for v in values
                         if not _sampling_value_ok(k, v)]
            continue
        for v in values:
            try:
                base_config.replace(**{k: v})
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ValueError("invalid grid: " + "; ".join(problems))


def build_points(grid: dict, base_config, workloads: list, identity: dict, check_sampling=None) -> list[Point]:
    """Every combination of ``grid`` values for every workload, as Points.

    identity: what else makes a point's key (model, sampling). Points sharing a quantization come next
    to each other (weights are re-quantized once per value), grid order otherwise. check_sampling(sampling):
    raises ValueError for a point's sampling (the sweep's merged with the grid's) that no request could run
    with (`trace_replay.request_params` with a made-up length); every problem of every combination is
    reported in one ValueError.
    """
    grid = normalise_grid(grid)
    check_grid(grid, base_config)
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*grid.values())] or [{}]
    points, problems = [], []
    base_sampling = dict(identity.get("sampling") or {})
    for w in workloads:
        for combo in combos:
            fields = {k: v for k, v in combo.items() if k not in SAMPLING_KEYS}
            sampling = {k: v for k, v in combo.items() if k in SAMPLING_KEYS}
            cfg = base_config.replace(**fields)  # a combination may still be invalid: raised here, not mid-sweep
            merged = {**base_sampling, **sampling}
            found = sampling_problems(merged, cfg)
            if not found and check_sampling is not None:
                try:
                    check_sampling(merged)
                except ValueError as e:
                    found = [str(e)]
            problems += [p for p in found if p not in problems]
            label = point_label(combo)
            if len(workloads) > 1:
                label = f"{w.name}: {label}"
            key = {"config": cfg.to_dict(), schema.C.workload: w.fingerprint(), **identity}
            if sampling:  # only then: the keys of points without grid sampling stay as they were
                key["grid_sampling"] = sampling
            points.append(Point(stable_hash(key), label, cfg, w, combo, sampling))
    if problems:
        raise ValueError("invalid grid: " + "; ".join(problems))
    order = {q: i for i, q in enumerate(dict.fromkeys(p.config.quantization for p in points))}
    return sorted(points, key=lambda p: order[p.config.quantization])
