"""The README's and the docs' runnable Python blocks, and the examples, run as a user runs them.

Blocks that need a server, a GPU or placeholders the reader fills in (``curves``, ``host``)
are not run here; the MCMC walk-through (minutes) and the Ray Tune example (Ray's start-up,
minutes on two shared cores) are marked slow.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent


def python_block(doc: str, index: int) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    assert len(blocks) > index, f"{doc} has {len(blocks)} python blocks, wanted #{index}"
    return str(blocks[index])


def run_block(doc: str, index: int) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "docs"}
    exec(compile(python_block(doc, index), f"{doc}#{index}", "exec"), ns)
    return ns


def test_readme_quickstart_runs_and_answers_what_it_says():
    ns = run_block("README.md", 0)
    posts, p = ns["posts"], ns["p"]
    assert len(posts) == 2
    assert p.mean.shape == (3,)  # query_epochs=[10, 25, 50]
    assert p.quantile([0.05, 0.95]).shape == (3, 2)
    assert ((p.mean >= 0) & (p.mean <= 1)).all()  # bounds=(0, 1)


def test_early_stopping_doc_decision_block_runs():
    ns = run_block("docs/early-stopping.md", 0)
    d = ns["d"]  # the loop's last decision: the loss curve, direction="min"
    assert isinstance(d.stop, bool) and 0.0 <= d.prob_improve <= 1.0
    assert d.reason


def run_example(*args: str, timeout: float = 300) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def epochs_trained(out: str) -> tuple[int, int]:
    m = re.search(r"epochs trained: (\d+) of (\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def test_optuna_example_runs_a_real_study():
    pytest.importorskip("optuna")
    out = run_example("examples/optuna_pruner.py", "--trials", "8", "--epochs", "6")
    assert "best accuracy" in out
    used, full = epochs_trained(out)
    assert full == 48 and 0 < used <= full
    assert len(re.findall(r"trial +\d+ (?:COMPLETE|PRUNED)", out)) == 8


def test_optuna_example_with_a_budget_stays_within_it():
    pytest.importorskip("optuna")
    out = run_example("examples/optuna_pruner.py", "--trials", "12", "--epochs", "6",
                      "--budget-runs", "4")
    used, _ = epochs_trained(out)
    assert used <= 4 * 6 + 6  # the study stops once the budget is spent (the last trial ends)


@pytest.mark.slow
def test_mcmc_doc_block_runs():
    ns = run_block("docs/mcmc.md", 0)
    assert "r" in ns


@pytest.mark.slow
def test_ray_example_runs_a_real_tune_study():
    pytest.importorskip("ray")
    out = run_example("examples/ray_tune_scheduler.py", "--samples", "4", "--epochs", "5",
                      timeout=900)
    used, full = epochs_trained(out)
    assert full == 20 and 0 < used <= full
