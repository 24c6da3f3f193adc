"""paged-workbench: workloads, sweeps, telemetry, figures and reports around the paged engine.

    from workbench import Sweep, make_workload
    sweep = Sweep(model="tiny", workload="shared-prefix", grid={"block_size": [8, 16, 32]})
    df = sweep.run(); sweep.write_report("report.html")
"""
from . import figures, metrics
from .report import write_report
from .sweep import Sweep, replay
from .telemetry import NullTelemetry, Telemetry, make_telemetry, measure_overhead
from .workloads import WORKLOADS, RequestSpec, Workload, load_workload, make_workload, workload_defaults

__all__ = ["Sweep", "replay", "Workload", "RequestSpec", "WORKLOADS", "make_workload", "load_workload",
           "workload_defaults", "Telemetry", "NullTelemetry", "make_telemetry", "measure_overhead",
           "write_report", "figures", "metrics"]
