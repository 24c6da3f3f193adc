# Triton chooses between compiling and its CPU interpreter when a @triton.jit function is defined,
# i.e. when triton (and each kernel module) is first imported, and transformers or torch may import
# triton early. So TRITON_INTERPRET is set here, before any test module loads, and only where there
# is no GPU: on a CUDA machine the kernels must be compiled for real.
import os

# One xdist worker per core gets that core's share of torch threads (and so do the processes it starts): with
# torch's default, one per core in every worker, OpenMP threads spin-wait for cores the other worker holds.
# Engine tests of the README's command (-n 2 on 2 cores) ran 2.9x faster so (198 s -> 68 s for six files).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cpus // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
