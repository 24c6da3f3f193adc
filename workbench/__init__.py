"""paged-workbench: workloads, sweeps, telemetry, figures and reports around the paged engine.

    from workbench import Sweep, make_workload
    sweep = Sweep(model="tiny", workload="shared-prefix", grid={"block_size": [8, 16, 32]}, repeats=3)
    df = sweep.run(); sweep.write_report("report.html")   # median of 3 interleaved runs per point, with min-max
"""
import importlib

# Names are imported on first use, so a headless GPU run (`python -m workbench bench`) does not
# import plotly and matplotlib just to reach the workloads.
_LAZY = {
    "figures": ".figures", "metrics": ".metrics", "schema": ".schema", "recommend": ".recommend",
    "run_point": ".point_run", "ResultsStore": ".store", "Point": ".grid", "write_report": ".report", "Sweep": ".sweep", "replay": ".trace_replay",
    "Telemetry": ".telemetry", "NullTelemetry": ".telemetry", "make_telemetry": ".telemetry",
    "measure_overhead": ".telemetry", "WORKLOADS": ".workloads", "RequestSpec": ".workloads",
    "Workload": ".workloads", "load_workload": ".workloads", "make_workload": ".workloads",
    "workload_defaults": ".workloads",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    return module if _LAZY[name] == f".{name}" else getattr(module, name)

__all__ = ["Sweep", "replay", "Workload", "RequestSpec", "WORKLOADS", "make_workload", "load_workload",
           "workload_defaults", "Telemetry", "NullTelemetry", "make_telemetry", "measure_overhead",
           "write_report", "figures", "metrics", "schema", "recommend", "run_point", "ResultsStore", "Point"]
