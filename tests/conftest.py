# Triton chooses between compiling and its CPU interpreter when a @triton.jit function is defined,
# i.e. when triton (and each kernel module) is first imported, and transformers or torch may import
# triton early. So TRITON_INTERPRET is set here, before any test module loads, and only where there
# is no GPU: on a CUDA machine the kernels must be compiled for real.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
