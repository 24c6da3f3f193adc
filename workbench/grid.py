"""The grid of a sweep: typed points from {EngineConfig field: [values]}, every value checked first.

`build_points` validates the whole grid before anything runs: unknown fields and every invalid value
are reported together in one ValueError (one line), and duplicate values are dropped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

from . import schema


@dataclass(frozen=True)
class Point:
    """One grid point: its key (point_id hashes config, workload, model and sampling), a short label,
    the full EngineConfig, the workload, and the grid values that make it (settings)."""

    point_id: str
    label: str
    config: object  # engine.EngineConfig
    workload: object  # workbench.workloads.Workload
    settings: dict = field(default_factory=dict)


def _fmt(v) -> str:
    return {True: "on", False: "off", None: "none"}.get(v, v) if isinstance(v, (bool, type(None))) else str(v)


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
    problems = [f"{k!r} is not an EngineConfig field (use one of {', '.join(allowed)})" for k in grid
                if k not in allowed]
    for k, values in grid.items():
        if k not in allowed:
            continue
        if not values:
            problems.append(f"{k} has no values")
        for v in values:
            try:
                base_config.replace(**{k: v})
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ValueError("invalid grid: " + "; ".join(problems))


def build_points(grid: dict, base_config, workloads: list, identity: dict) -> list[Point]:
    """Every combination of ``grid`` values for every workload, as Points.

    identity: what else makes a point's key (model, sampling). Points sharing a quantization come next
    to each other (weights are re-quantized once per value), grid order otherwise.
    """
    grid = normalise_grid(grid)
    check_grid(grid, base_config)
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*grid.values())] or [{}]
    points = []
    for w in workloads:
        for combo in combos:
            cfg = base_config.replace(**combo)  # a combination may still be invalid: raised here, not mid-sweep
            label = point_label(combo)
            if len(workloads) > 1:
                label = f"{w.name}: {label}"
            pid = stable_hash({"config": cfg.to_dict(), schema.C.workload: w.fingerprint(), **identity})
            points.append(Point(pid, label, cfg, w, combo))
    order = {q: i for i, q in enumerate(dict.fromkeys(p.config.quantization for p in points))}
    return sorted(points, key=lambda p: order[p.config.quantization])
