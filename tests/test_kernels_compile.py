"""The kernels compile for real GPUs (no GPU needed), and the benchmark behaves without CUDA.

Triton's wheel bundles LLVM and ptxas: ``serve.kernels.aot`` compiles a launch down to a cubin
for sm_80 / sm_90 and reads ptxas' register and spill counts. This runs in a subprocess
without ``TRITON_INTERPRET`` (which this test session sets). Nothing here is timed or executed
on a GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

COMPILE_SNIPPET = """
import json, warnings
import torch
warnings.filterwarnings("ignore")
from serve.kernels import attention, posterior
from serve.kernels.aot import compile_launch

out = {}
for dtype in (torch.float32, torch.float16):  # the default model's attention: H=4, D=64
    B, H, L, D = 64, 4, 100, 64
    q, k, v = torch.empty(B, L, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)
    o = torch.empty(B, L, H, D, dtype=dtype).permute(0, 2, 1, 3)
    launch = attention.attention_launch(q, k, v, torch.zeros(B, L, dtype=torch.bool), o)
    out[f"attention-{dtype}"] = compile_launch(attention._pfn_attention_kernel, launch, 80)
R, n = 1024, 1000
tab = posterior.BucketTable.build(torch.linspace(-0.2, 1.2, n + 1))
launch = posterior.posterior_launch(
    torch.empty(R, n), tab, torch.empty(1, 3), torch.empty(1, 2), torch.empty(1, 2),
    torch.empty(4, R), torch.empty(R, 3), torch.empty(R, 2), torch.empty(R, 2))
out["posterior"] = compile_launch(posterior._posterior_kernel, launch, 80)
print(json.dumps({k: vars(r) for k, r in out.items()}))
"""


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_kernels_compile_for_sm80_without_spills():
    r = run(["-c", COMPILE_SNIPPET])
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(reports) == {"attention-torch.float32", "attention-torch.float16", "posterior"}
    for name, rep in reports.items():
        assert rep["arch"] == 80
        assert rep["spill_bytes"] == 0, (name, rep)
        assert 0 < rep["registers"] <= 255, (name, rep)
    assert reports["attention-torch.float16"]["mma"]  # fp16 q·kᵀ and p·v on tensor cores


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real benchmark")
def test_benchmark_without_cuda_says_so_and_exits_zero(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_kernels", ROOT / "bench" / "gpu_kernels.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["gpu_kernels.py"])
    assert bench.main() == 0
    assert "no CUDA device: nothing timed" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_compile_report_all_shapes():
    r = run(["bench/gpu_kernels.py", "--compile", "--archs", "80,90"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines()
            if line.startswith(("attention", "posterior"))]
    assert len(rows) == 26
    assert all(int(row[-3]) == 0 for row in rows), r.stdout  # spill bytes
