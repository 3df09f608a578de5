"""Prune an Optuna study with curvecast: trials predicted not to beat the best so far stop early.

    pip install 'curvecast[optuna]'
    python examples/optuna_pruner.py [--trials 20] [--epochs 20] [--no-calibrate]
    python examples/optuna_pruner.py --trials 40 --epochs 15 --budget-runs 10   # budget-aware

A small MLP is trained on a synthetic classification task; each trial tries a learning rate and
a width, reports validation accuracy after every epoch, and asks the pruner whether to go on.
The pruner runs the embedded model for decisions (``stage4``) in-process. To use a curvecast
server instead, pass any client object with an ``early_stop(curves, incumbents, rule=...)``
method as the backend: ``CurvecastPruner(horizon, backend=client)`` (see ``pfn.hpo``). With
``--budget-runs R`` the study may spend R full runs' worth of epochs on its trials
(``Budget(n_trials, R x epochs)``): the pruner then weighs what a stop saves against the
untried trials (docs/early-stopping.md), and the study ends when the budget is spent.
"""

from __future__ import annotations

import argparse

import optuna
import torch
from torch import nn

from pfn.early_stop import Budget, StopRule
from pfn.hpo.optuna import CurvecastPruner


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 20, generator=g)
    w = torch.randn(20, 3, generator=g)
    y = (x @ w + 0.5 * torch.randn(3000, 3, generator=g)).argmax(1)
    return x[:2000], y[:2000], x[2000:], y[2000:]


def make_objective(epochs: int) -> optuna.study.study.ObjectiveFuncType:
    xtr, ytr, xva, yva = data()

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-5, 1.0, log=True)
        width = trial.suggest_int("width", 4, 128, log=True)
        torch.manual_seed(trial.number)
        net = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 3))
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        acc = 0.0
        for epoch in range(epochs):  # steps 0 .. epochs-1: horizon=epochs, first_step=0
            for i in range(0, len(xtr), 100):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xtr[i:i + 100]), ytr[i:i + 100]).backward()
                opt.step()
            with torch.no_grad():
                acc = float((net(xva).argmax(1) == yva).float().mean())
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    return objective


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--no-calibrate", action="store_true",
                    help="decide with the model alone (no calibration on completed trials)")
    ap.add_argument("--budget-runs", type=float, default=None,
                    help="budget-aware pruning: all trials together may train this many full "
                    "runs' worth of epochs")
    ap.add_argument("--budget-rule", choices=("rungs", "opportunity"), default="rungs",
                    help="with --budget-runs: compare trials at rungs (default) or by "
                    "expected improvement (docs/early-stopping.md)")
    a = ap.parse_args()
    budget = None if a.budget_runs is None else Budget(a.trials, a.budget_runs * a.epochs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and kind to a shared CPU
    pruner = CurvecastPruner(a.epochs, rule=StopRule(delta=a.delta), bounds=(0.0, 1.0),
                             calibrate=not a.no_calibrate, budget=budget,
                             budget_rule=a.budget_rule)
    study = optuna.create_study(direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=0))

    def budget_spent(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if budget is not None and sum(len(t.intermediate_values)
                                      for t in study.trials) >= budget.epochs:
            study.stop()

    study.optimize(make_objective(a.epochs), n_trials=a.trials, callbacks=[budget_spent])
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    print(f"best accuracy {study.best_value:.3f} with {study.best_params}")
    print(f"epochs trained: {epochs} of {a.trials * a.epochs} without pruning")
    for t in study.trials:
        a_ = t.user_attrs
        pred = (f"predicted final {a_['curvecast_final_mean']:.3f}, "
                f"P(improve) {a_['curvecast_prob_improve']:.3f}" if a_ else "")
        print(f"  trial {t.number:2d} {t.state.name:8s} {len(t.intermediate_values):3d} epochs "
              f"value {t.value if t.value is not None else float('nan'):.3f}  {pred}")
        if t.state.name == "PRUNED" and a_:
            print(f"           {a_['curvecast_reason']}")


if __name__ == "__main__":
    main()
