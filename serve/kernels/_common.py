"""What both kernels share: the path setting, the user error, the interpreter flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from pfn.errors import CurvecastError

# "auto": the Triton kernel for CUDA tensors, the torch twin otherwise (and whenever autograd
# needs a graph: the kernels have no backward); "triton" / "torch" force a path.
KernelMode = Literal["auto", "triton", "torch"]
MODES: tuple[str, ...] = get_args(KernelMode)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(CurvecastError):
    """Input a kernel wrapper rejects before launch: shape, dtype, device or mode."""

    status_code = 422

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}; {fix}")


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


def use_triton(mode: str, x: Tensor, interpreted: bool, needs_grad: bool = False) -> bool:
    """Whether a call with setting ``mode`` on tensor ``x`` runs the kernel (else the twin)."""
    if mode not in MODES:
        raise KernelInputError("mode", f"must be one of {MODES}, got {mode!r}",
                               "pass 'auto', 'triton' or 'torch'")
    if mode == "torch":
        return False
    if mode == "auto":
        return x.is_cuda and not needs_grad
    if needs_grad:
        raise KernelInputError("mode", "'triton' has no backward, but autograd is recording",
                               "call under torch.no_grad()/inference_mode() or use mode 'auto'")
    if not (x.is_cuda or interpreted):
        raise KernelInputError(
            "mode", f"'triton' needs CUDA tensors, got device {x.device}",
            "move the inputs to a GPU, set TRITON_INTERPRET=1 before importing serve.kernels "
            "(CPU interpreter, for tests), or use mode 'auto'/'torch'")
    return True


def check_float(name: str, x: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(name, f"dtype must be float32, float16 or bfloat16, got {x.dtype}",
                               f"convert with {name}.float()")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Launch:
    """One kernel launch, described once: the wrappers run it, ``serve.kernels.aot`` compiles
    it ahead of time (for a GPU this machine need not have)."""

    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments by name
    constexprs: dict[str, Any]
    num_warps: int

    def run(self, kernel: Any) -> None:
        kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)
