"""Ahead-of-time compilation of the kernels for NVIDIA GPUs, on any machine (no GPU needed).

Triton's wheel bundles LLVM and ``ptxas``, so a launch (``serve.kernels._common.Launch``) built
from example CPU tensors can be compiled down to a cubin for, say, sm_80 and sm_90. That proves
the kernels are valid compiled Triton (not only interpretable: shapes, dtypes, ``tl.dot``
constraints) and reports their registers, spills (``ptxas -v``) and shared memory. It says
nothing about speed. The arguments are specialised as Triton's JIT does: integers equal to 1 become
constants, integers divisible by 16 and all pointers are marked 16-divisible.

Must run in a process where ``TRITON_INTERPRET`` is unset (decorated kernels are otherwise
interpreter objects): ``python bench/gpu_kernels.py --compile``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from serve.kernels._common import Launch, is_interpreted

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}


@dataclass(frozen=True)
class CompileReport:
    arch: int  # e.g. 80 for sm_80
    registers: int  # per thread
    spill_bytes: int  # bytes of register spill stores (local memory); 0 is the goal
    shared_bytes: int
    mma: bool  # the PTX uses tensor-core mma/wgmma instructions


def _signature(kernel: Any, launch: Launch) -> tuple[dict[str, str], dict[str, Any], dict]:
    sig: dict[str, str] = {}
    consts: dict[str, Any] = dict(launch.constexprs)
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            continue
        v = launch.args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{name}: cannot specialise {type(v).__name__}")
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_launch(kernel: Any, launch: Launch, arch: int = 80) -> CompileReport:
    """Compile ``kernel`` as ``launch`` would run it, for ``sm_{arch}``; report resources."""
    if is_interpreted(kernel):
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; compile in a "
                           "process without it")
    sig, consts, attrs = _signature(kernel, launch)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": launch.num_warps})
    cc = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target,
                        options=options.__dict__)
    ptxas = get_ptxas(arch).path  # the one Triton itself uses for this arch
    gpu = re.search(r"^\.target\s+(sm_\w+)", cc.asm["ptx"], re.M)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(cc.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={gpu.group(1) if gpu else f'sm_{arch}'}", ptx,
                              "-o", os.path.join(d, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v: unexpected output {log!r}")
    return CompileReport(arch, int(regs.group(1)), int(spills.group(1)),
                         int(cc.metadata.shared),
                         mma=bool(re.search(r"\b(w?gmma|mma)\.", cc.asm["ptx"])))
