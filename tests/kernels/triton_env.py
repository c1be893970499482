"""Where the Triton tests run: on a CUDA device when there is one, else in the interpreter.

Triton decides at import whether it interprets (TRITON_INTERPRET=1) or compiles, and
tests elsewhere in the suite import it first (torch.compile does), so these modules do not run
in the main pytest process on a CPU machine: tests/ops/test_triton_interpreter.py runs them in
a subprocess with TRITON_INTERPRET=1. `reason` is why they skip here, or None.
"""
import torch

from microdit.availability import triton_available_reasons, triton_interpret

DEVICE = "cpu" if triton_interpret() or not torch.cuda.is_available() else "cuda"
_reasons = triton_available_reasons()
reason = ("; ".join(_reasons) + " (tests/ops/test_triton_interpreter.py runs these with TRITON_INTERPRET=1)"
          if _reasons else None)
# The interpreter runs float32 only; on a GPU the kernels are checked in bfloat16 as well.
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16]
