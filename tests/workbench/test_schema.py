"""The results schema: every column once, with what the report and tables need; nothing else spells one."""
import ast
from pathlib import Path

import pytest

from engine import EngineConfig
from workbench import schema
from workbench.schema import C

WORKBENCH = Path(schema.__file__).parent
# Names that equal a results column but mean something in another vocabulary, per file (None: the whole
# file): the planner's own table; NVML sample fields (defined by the sampler); engine StepStats counters
# shown step by step; the allocator-comparison tables of workbench.baselines (their own columns); the
# workload's trace fields and parameters, and "concurrency" as the name of an arrival process.
OTHER_TABLES = {"planner.py": None, "planner_figures.py": None,
                "telemetry.py": {"energy_j"}, "metrics.py": {"energy_j"},
                "block_map.py": {"block_size", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions"},
                "baselines.py": None, "allocators.py": None, "workloads.py": None,
                "trace_replay.py": {"concurrency"}, "__main__.py": {"concurrency"},
                # engine counters (EngineStats / StepStats fields, Prometheus samples), not results columns
                "metrics_scrape.py": {"block_size", "num_gpu_blocks", "num_preemptions", "num_steps",
                                      "prefix_cache_hits", "prefix_cache_queries"},
                "trace_export.py": {"device", "num_preemptions"},
                # a failed request's record and an OpenAI error body have their own "error" field, an OpenAI
                # request body its "n"
                "loadtest_cli.py": {"error"}, "loadtest_http.py": {"error", "n"}}


def _string_constants(source: str) -> set[str]:
    """Every string literal of a module except docstrings."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def test_every_column_is_complete():
    for c in schema.COLUMNS:
        assert c.label and c.agg in (schema.MEDIAN, schema.FIRST) and c.better in (None, schema.HIGHER, schema.LOWER)
        assert c.kind in (schema.ID, schema.CONFIG, schema.WORKLOAD, schema.METRIC, schema.ENGINE, schema.TELEMETRY,
                          schema.PROFILE)
        if c.agg == schema.MEDIAN:
            assert c.unit, f"{c.name} is a measured number without a unit"


def test_config_columns_are_exactly_the_engine_config_fields():
    assert schema.config_columns() == list(EngineConfig().to_dict())


def test_names_are_checked():
    assert C.output_throughput == "output_throughput"
    with pytest.raises(AttributeError, match="not a results column"):
        C.output_througput  # noqa: B018
    assert schema.title(C.output_throughput) == "output throughput (tokens/s)"
    assert schema.spread(C.ttft_p99_ms) == ("ttft_p99_ms_min", "ttft_p99_ms_max")


def test_a_real_row_has_only_schema_columns(synthetic):
    df = synthetic[0]
    assert [c for c in df.columns if c not in schema.BY_NAME] == []


def test_no_other_workbench_module_spells_a_column_name():
    offenders = []
    for path in sorted(WORKBENCH.rglob("*.py")):
        if path.name == "schema.py":
            continue
        allowed = OTHER_TABLES.get(path.name, set())
        if allowed is None:
            continue
        strings = _string_constants(path.read_text())
        offenders += [f"{path.relative_to(WORKBENCH)}: {name!r}" for name in schema.BY_NAME
                      if name in strings and name not in allowed]
    assert offenders == [], "spell these as schema.C.<name>:\n" + "\n".join(offenders)
