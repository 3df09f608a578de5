"""Stop Ray Tune trials with curvecast: a FIFO scheduler plus curvecast's stop/continue rule.

    pip install 'curvecast[ray]'
    python examples/ray_tune_scheduler.py [--samples 12] [--epochs 20]
    python examples/ray_tune_scheduler.py --samples 16 --epochs 12 --budget-runs 6   # budget-aware

Each trial trains a small MLP on a synthetic task and reports validation accuracy once per
epoch (``training_iteration`` counts epochs from 1, so ``horizon`` is the number of epochs).
The scheduler's state is saved as JSON at the end (``save``/``restore``). To use a curvecast
server instead of in-process inference, pass a client with an ``early_stop(curves, incumbents,
rule=...)`` method as ``backend`` (see ``pfn.hpo``). With ``--budget-runs R`` the scheduler
knows the plan, ``Budget(num_samples, R x epochs)``, and stops budget-aware
(docs/early-stopping.md).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import ray
from ray import tune

from pfn.early_stop import Budget, StopRule
from pfn.hpo.ray import CurvecastScheduler


def train(config: dict[str, Any]) -> None:
    import torch  # imported in the worker
    from torch import nn

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 20, generator=g)
    y = (x @ torch.randn(20, 3, generator=g) + 0.5 * torch.randn(3000, 3, generator=g)).argmax(1)
    xtr, ytr, xva, yva = x[:2000], y[:2000], x[2000:], y[2000:]
    net = nn.Sequential(nn.Linear(20, config["width"]), nn.ReLU(), nn.Linear(config["width"], 3))
    opt = torch.optim.SGD(net.parameters(), lr=config["lr"])
    for _ in range(config["epochs"]):
        for i in range(0, len(xtr), 100):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[i:i + 100]), ytr[i:i + 100]).backward()
            opt.step()
        with torch.no_grad():
            tune.report({"acc": float((net(xva).argmax(1) == yva).float().mean())})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--state", help="save the scheduler's state (JSON) to this file")
    ap.add_argument("--budget-runs", type=float, default=None,
                    help="budget-aware stopping: all trials together may train this many full "
                    "runs' worth of epochs")
    ap.add_argument("--budget-rule", choices=("rungs", "opportunity"), default="rungs",
                    help="with --budget-runs: compare trials at rungs (default) or by "
                    "expected improvement (docs/early-stopping.md)")
    a = ap.parse_args()
    budget = None if a.budget_runs is None else Budget(a.samples, a.budget_runs * a.epochs)
    import torch

    # The scheduler's in-process inference runs in this driver: a single trial's decision is a
    # tiny batch, fastest on one thread (two threads on a busy CPU can be ~50x slower).
    torch.set_num_threads(1)
    sched = CurvecastScheduler(a.epochs, metric="acc", mode="max", bounds=(0.0, 1.0),
                               rule=StopRule(delta=a.delta), budget=budget,
                               budget_rule=a.budget_rule)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tuner = tune.Tuner(
                train,
                param_space={"lr": tune.loguniform(1e-5, 1.0), "width": tune.randint(4, 129),
                             "epochs": a.epochs},
                tune_config=tune.TuneConfig(scheduler=sched, num_samples=a.samples,
                                            max_concurrent_trials=2),
                run_config=tune.RunConfig(storage_path=tmp, verbose=0),
            )
            results = tuner.fit()
    finally:
        ray.shutdown()
    best = results.get_best_result(metric="acc", mode="max")
    metrics, config = best.metrics or {}, best.config or {}
    used = sum(len(h) for h in sched.histories.values())
    print(f"best accuracy {metrics['acc']:.3f} with lr={config['lr']:.2g} "
          f"width={config['width']}")
    print(f"epochs trained: {used} of {a.samples * a.epochs}; {sched.debug_string()}")
    if a.state:
        sched.save(a.state)
        again = CurvecastScheduler(a.epochs)
        again.restore(a.state)
        print(f"state saved to {a.state} and restored: {again.debug_string()}")


if __name__ == "__main__":
    main()
