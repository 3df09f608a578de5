import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.config import TrainConfig, apply_overrides, load_config, parse_cli_overrides
from train.loop import Trainer, lr_at

TINY = {
    "model.n_layers": 1, "model.d_model": 16, "model.n_heads": 2, "model.d_ff": 32,
    "model.n_buckets": 20, "model.encoder_hidden": 8, "batch_size": 8, "border_curves": 200,
    "eval_every": 0, "log_every": 1, "threads": 1,
}


def _args(d):
    return [f"--{k}={v}" for k, v in d.items()]


def test_overrides_typed_and_unknown_rejected(tmp_path):
    cfg = apply_overrides(TrainConfig(), parse_cli_overrides(["--lr=3e-4", "--model.n_layers", "5",
                                                              "--bf16=true"]))
    assert cfg.lr == 3e-4 and cfg.model.n_layers == 5 and cfg.bf16 is True
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        apply_overrides(TrainConfig(), {"lrr": 1})
    with pytest.raises(ValueError, match="unknown config key 'model.width'"):
        apply_overrides(TrainConfig(), {"model.width": 1})
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(TrainConfig(), {"batch_size": "many"})
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\n[model]\nn_layers = 2\n')
    cfg = load_config(f, {"seed": "3"})
    assert (cfg.lr, cfg.model.n_layers, cfg.seed) == (0.01, 2, 3)
    f.write_text('[model]\nn_layerz = 2\n')
    with pytest.raises(ValueError, match="n_layerz"):
        load_config(f)


def test_lr_schedule():
    cfg = TrainConfig(n_curves=128 * 100, warmup_frac=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(0.1 * cfg.lr, rel=0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def _losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]  # later lines (after a resume) win
    return out


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    steps = 12
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    base = apply_overrides(TrainConfig(), {**TINY, "n_curves": 8 * steps, "ckpt_every": 2,
                                           "ema_decay": 0.9})
    Trainer(apply_overrides(base, {"out_dir": str(ref_dir)})).run(progress=False)
    ref = _losses(ref_dir / "metrics.jsonl")
    assert sorted(ref) == list(range(1, steps + 1))

    args = [sys.executable, "-m", "train", *_args({**TINY, "n_curves": 8 * steps, "ckpt_every": 2,
                                                  "ema_decay": 0.9, "out_dir": run_dir}),
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _losses(metrics)
    assert max(done) < steps, "run finished before it could be killed"
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got = _losses(metrics)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), s
    # the exported (EMA-averaged) weights are bit-identical too
    cfgs = [json.loads((d / "model" / "config.json").read_text()) for d in (ref_dir, run_dir)]
    assert cfgs[0]["sha256"] == cfgs[1]["sha256"] and cfgs[0]["meta"]["ema"] is True


def test_warm_start_adds_the_sharpening_head_and_keeps_the_answers(tmp_path):
    """init_from copies a finished run's EMA weights; the new head starts as the identity, so
    the warm-started model answers exactly as its source, and trains on from there."""
    from pfn.evaluate import prior_log_likelihood
    from train.export import model_from_checkpoint

    src_dir = tmp_path / "src"
    cfg = apply_overrides(TrainConfig(), {**TINY, "n_curves": 32, "ema_decay": 0.9,
                                          "out_dir": str(src_dir)})
    Trainer(cfg).run(progress=False)
    src, _ = model_from_checkpoint(src_dir)
    warm_cfg = apply_overrides(cfg, {"init_from": str(src_dir), "model.sharpen_head": True,
                                     "seed": 5, "out_dir": str(tmp_path / "warm")})
    tr = Trainer(warm_cfg)
    y = torch.rand(6, 100, generator=torch.Generator().manual_seed(0))
    got = prior_log_likelihood(tr.model.eval(), y, 40)
    assert torch.allclose(got, prior_log_likelihood(src, y, 40), atol=1e-5)
    tr.run(progress=False)
    assert not torch.equal(tr.model.sharpen.weight, torch.zeros_like(tr.model.sharpen.weight))
    meta = json.loads((tmp_path / "warm" / "model" / "config.json").read_text())["meta"]
    assert (meta["curves_seen"], meta["curves_seen_total"]) == (32, 64)
    # a source with parameters the model has no place for is refused
    with pytest.raises(ValueError, match="no place"):
        Trainer(apply_overrides(warm_cfg, {"init_from": str(tmp_path / "warm"),
                                           "model.sharpen_head": False,
                                           "out_dir": str(tmp_path / "x")}))


def test_a_warm_start_on_its_sources_seed_is_warned_about(tmp_path, capsys):
    """Every run of a warm-start chain that shares a seed draws the same prior curves (the
    shipped stages did, until the eleventh session): the chain's seeds are found through run
    directories and exported models, and a repeat is named at start-up."""
    from train.export import seeds_before

    a = apply_overrides(TrainConfig(), {**TINY, "n_curves": 16, "seed": 3,
                                        "out_dir": str(tmp_path / "a")})
    Trainer(a).run(progress=False)
    b = apply_overrides(a, {"init_from": str(tmp_path / "a" / "model"), "seed": 4,
                            "out_dir": str(tmp_path / "b")})
    capsys.readouterr()
    Trainer(b).run(progress=False)
    assert "warning: seed" not in capsys.readouterr().err
    assert seeds_before(str(tmp_path / "b")) == [4, 3]  # run directory, then exported model
    assert seeds_before(str(tmp_path / "b" / "model")) == [4, 3]
    assert seeds_before("") == [] and seeds_before(str(tmp_path / "nowhere")) == []
    Trainer(apply_overrides(b, {"init_from": str(tmp_path / "b"), "seed": 3,
                                "out_dir": str(tmp_path / "c")}))
    err = capsys.readouterr().err
    assert "warning: seed=3 was already used" in err and "set seed to a new value" in err


def test_warm_start_grows_depth_with_identity_blocks(tmp_path):
    """A deeper model warm-started from a shallower run gets the source's blocks at the
    bottom and identity blocks on top: same answers at the start, and the new blocks train."""
    from pfn.evaluate import prior_log_likelihood
    from train.export import model_from_checkpoint

    src_dir = tmp_path / "src"
    cfg = apply_overrides(TrainConfig(), {**TINY, "n_curves": 32, "out_dir": str(src_dir)})
    Trainer(cfg).run(progress=False)
    src, _ = model_from_checkpoint(src_dir)
    grown = apply_overrides(cfg, {"init_from": str(src_dir), "model.n_layers": 3,
                                  "out_dir": str(tmp_path / "grown")})
    tr = Trainer(grown)
    assert len(tr.model.blocks) == 3
    assert torch.equal(tr.model.blocks[0].qkv.weight, src.blocks[0].qkv.weight)
    y = torch.rand(6, 100, generator=torch.Generator().manual_seed(0))
    got = prior_log_likelihood(tr.model.eval(), y, 40)
    assert torch.allclose(got, prior_log_likelihood(src, y, 40), atol=1e-5)
    tr.run(progress=False)
    assert tr.model.blocks[2].ff2.weight.abs().sum() > 0  # the new block learned


def test_decay_input_is_trained_on_the_priors_flags(tmp_path):
    """A model given a decay input, warm-started from one without, answers as its source at
    the start and learns the decay vector from the prior's anneal flags, which reach the model
    through training_batch and every query micro-batch."""
    from prior import get_prior
    from train.loop import query_microbatches, training_batch

    src_dir = tmp_path / "src"
    cfg = apply_overrides(TrainConfig(), {**TINY, "n_curves": 32, "out_dir": str(src_dir)})
    Trainer(cfg).run(progress=False)
    prior = get_prior("lcpfn-anneal0.5")
    g = torch.Generator().manual_seed(2)
    t, y, is_ctx, decay, _, _ = training_batch(prior, 64, g, 1)
    want = prior.sample(64, torch.Generator().manual_seed(2)).annealed
    assert want is not None and torch.equal(decay, want.float()) and 0 < float(decay.sum()) < 64
    mbs = query_microbatches(t, y, is_ctx, 4, 3, g, decay=decay)
    assert sorted(float(f) for mb in mbs for f in mb.decay) == sorted(decay.tolist())
    warm = apply_overrides(cfg, {"init_from": str(src_dir), "model.decay_input": True,
                                 "prior": "lcpfn-anneal0.5", "out_dir": str(tmp_path / "w"),
                                 "trainable": "decay_emb,decay_adapters"})
    tr = Trainer(warm)
    assert tr.model.decay_emb is not None and not bool(tr.model.decay_emb.any())
    body = {n: p.detach().clone() for n, p in tr.model.named_parameters()
            if not n.startswith("decay")}
    tr.run(progress=False)
    assert float(tr.model.decay_emb.detach().abs().sum()) > 0  # learned from the flags
    assert tr.model.decay_adapters is not None
    assert float(tr.model.decay_adapters[0][-1].weight.detach().abs().sum()) > 0
    now = dict(tr.model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in body.items())  # the body stayed frozen


def test_eval_prior_sets_the_held_out_curves(tmp_path):
    """Training on slow starts, evaluating on the paper's prior: the held-out curves come from
    eval_prior (same seed), not from the training prior."""
    from prior import get_prior

    base = {**TINY, "eval_every": 1, "eval_curves": 16, "out_dir": str(tmp_path)}
    tr = Trainer(apply_overrides(TrainConfig(), {**base, "prior": "lcpfn-slowstart",
                                                 "eval_prior": "lcpfn"}))
    want = get_prior("lcpfn").sample(16, torch.Generator().manual_seed(10_000)).y
    assert torch.equal(tr.eval_set, want)
    own = Trainer(apply_overrides(TrainConfig(), {**base, "prior": "lcpfn-slowstart"}))
    assert not torch.equal(own.eval_set, want)


def test_resume_rejects_other_config(tmp_path):
    cfg = apply_overrides(TrainConfig(), {**TINY, "n_curves": 16, "out_dir": str(tmp_path)})
    Trainer(cfg).run(progress=False)
    with pytest.raises(ValueError, match="config differs"):
        Trainer(apply_overrides(cfg, {"lr": 0.5})).run(progress=False)


@pytest.mark.parametrize("max_queries", [0, 4])
def test_ddp_two_gloo_processes(tmp_path, max_queries):
    """Two ranks train one model; with max_queries the micro-batches sync on the last one."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--standalone", "-m", "train",
            *_args({**TINY, "n_curves": 8 * 4, "ckpt_every": 2, "out_dir": out, "device": "cpu",
                    "max_queries": max_queries, "query_groups": 2}),
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]  # rank 0 logs alone
    from train.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "checkpoint.safetensors")
    assert ck["meta"]["world"] == 2 and len(ck["rng_prior"]) == 2
    assert not torch.equal(ck["rng_prior"][0], ck["rng_prior"][1])  # different prior streams
    assert (out / "model" / "config.json").exists()


def test_sigterm_checkpoints_the_step_reached_and_n_curves_retargets(tmp_path):
    from train.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    opts = {**TINY, "n_curves": 8 * 10_000, "ckpt_every": 1_000, "out_dir": run_dir}
    proc = subprocess.Popen([sys.executable, "-m", "train", *_args(opts), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    step = int(load_checkpoint(run_dir / "checkpoint.safetensors")["meta"]["step"])
    assert 3 <= step < 1_000  # saved on SIGTERM, not at a ckpt_every multiple
    # a shorter schedule is accepted on resume (and said), the lr follows the new one
    end = step + 2
    r = subprocess.run([sys.executable, "-m", "train", *_args({**opts, "n_curves": 8 * end}),
                        "--no-progress"], capture_output=True, text=True, check=True)
    assert f"n_curves {8 * 10_000:,} -> {8 * end:,}" in r.stderr
    last = json.loads(metrics.read_text().splitlines()[-1])
    cfg = apply_overrides(TrainConfig(), {**TINY, "n_curves": 8 * end})
    assert last["step"] == end and last["lr"] == pytest.approx(lr_at(cfg, end - 1))


def _tiny_model_and_batch(n: int = 12):
    from pfn.bar import borders_from_samples
    from pfn.model import PFN, PFNConfig
    from prior import get_prior
    from train.loop import training_batch

    g = torch.Generator().manual_seed(3)
    prior = get_prior("lcpfn")
    cfg = PFNConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, n_buckets=20, encoder_hidden=8)
    torch.manual_seed(0)
    model = PFN(cfg, borders_from_samples(prior.sample(200, g).y.flatten(), 20)).train()
    return model, training_batch(prior, n, g, 1)[:3], g


def test_expected_targets_average_the_noisy_targets_loss_and_ride_through_microbatches():
    """expected_targets: the loss at (f, sigma) is the mean of the noisy-target loss over
    fresh noise on the queries (context unchanged); through the query micro-batches (all
    queries kept) it gives the full layout's loss and gradients; a run trains with it."""
    from prior import get_prior
    from train.loop import loss_fn, query_microbatches, subsampled_loss, training_batch

    model, _, g = _tiny_model_and_batch()
    model.eval()
    t, y, is_ctx, _, f, sigma = training_batch(get_prior("lcpfn"), 12, g, 1)
    sd = sigma[:, None].expand_as(f)  # (n, m)
    amp = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        want = float(loss_fn(model, model, t, y, is_ctx, amp, True, target=(f, sd)))
        draws = []
        for _ in range(300):
            y2 = torch.where(is_ctx, y, f + sd * torch.randn(f.shape, generator=g))
            draws.append(float(loss_fn(model, model, t, y2, is_ctx, amp, True)))
    d = torch.tensor(draws)
    assert abs(float(d.mean()) - want) < 4 * float(d.std()) / len(d) ** 0.5
    model.train()
    full = loss_fn(model, model, t, y, is_ctx, amp, True, target=(f, sd))
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mbs = query_microbatches(t, y, is_ctx, 100, 5, g, True, target=(f, sd))
    got = sum(subsampled_loss(model, model, mb, amp, float((~is_ctx).sum())) for mb in mbs)
    got.backward()
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_training_batch_log_share_shortens_the_contexts():
    """cutoff_log_share reaches the batch: context masks are prefixes, and a log-uniform share
    puts many more curves at one observed epoch than uniform cutoffs do (1/99)."""
    from prior import get_prior
    from train.loop import training_batch

    prior = get_prior("lcpfn")
    n_ctx = {}
    for share in (0.0, 1.0):
        is_ctx = training_batch(prior, 2000, torch.Generator().manual_seed(5), 1,
                                share).is_ctx
        k = is_ctx.sum(1)
        assert torch.equal(is_ctx, torch.arange(100)[None, :] < k[:, None])  # prefixes
        n_ctx[share] = float((k == 1).double().mean())
    assert n_ctx[0.0] < 0.03 and 0.12 < n_ctx[1.0] < 0.18  # log(2) / log(100) = 0.15


@pytest.mark.parametrize("per_curve", [False, True])
@pytest.mark.parametrize("groups", [1, 5, 40])
def test_all_queries_kept_equals_the_full_batch_loss_and_gradient(groups, per_curve):
    """max_queries >= every curve's query count keeps every token: the micro-batches (sorted,
    regrouped, padded, tokens reordered within a row) give the full layout's loss and
    gradients, which checks the layout, the masks and the weights (per token or per curve)."""
    from train.loop import loss_fn, query_microbatches, subsampled_loss

    model, (t, y, is_ctx), g = _tiny_model_and_batch()
    amp = torch.autocast("cpu", enabled=False)
    full = loss_fn(model, model, t, y, is_ctx, amp, per_curve)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mbs = query_microbatches(t, y, is_ctx, 100, groups, g, per_curve)
    assert len(mbs) == min(groups, len(t))
    assert sum(int(mb.select.sum()) for mb in mbs) == int((~is_ctx).sum())
    got = sum(subsampled_loss(model, model, mb, amp, float((~is_ctx).sum())) for mb in mbs)
    got.backward()
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6), n


def test_per_curve_loss_is_the_mean_of_each_curves_mean():
    """per_curve weighs curves, not tokens: it equals the mean over curves of each curve's
    mean query loss (computed here curve by curve), and differs from the per-token mean when
    the curves' query counts differ."""
    from train.loop import loss_fn

    model, (t, y, is_ctx), _ = _tiny_model_and_batch()
    model.eval()
    amp = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        per_curve = float(loss_fn(model, model, t, y, is_ctx, amp, per_curve=True))
        per_token = float(loss_fn(model, model, t, y, is_ctx, amp))
        means = [float(loss_fn(model, model, t[i:i + 1], y[i:i + 1], is_ctx[i:i + 1], amp))
                 for i in range(len(t))]
    assert len(set(is_ctx.sum(1).tolist())) > 1  # the batch mixes cutoffs
    assert per_curve == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert abs(per_curve - per_token) > 1e-4


def test_subsampled_queries_are_an_unbiased_estimate_of_the_loss():
    """With 3 queries kept per curve (of up to 99), the reweighted loss averages to the
    all-queries loss over many draws, fewer tokens go through the model, and the kept
    queries are later epochs of their own curve."""
    from train.loop import loss_fn, query_microbatches, subsampled_loss

    model, (t, y, is_ctx), g = _tiny_model_and_batch()
    model.eval()
    amp = torch.autocast("cpu", enabled=False)
    total = float((~is_ctx).sum())
    with torch.no_grad():
        full = float(loss_fn(model, model, t, y, is_ctx, amp))
        draws = []
        for _ in range(400):
            mbs = query_microbatches(t, y, is_ctx, 3, 4, g)
            draws.append(float(sum(subsampled_loss(model, model, mb, amp, total)
                                   for mb in mbs)))
    d = torch.tensor(draws)
    se = float(d.std()) / len(draws) ** 0.5
    assert abs(float(d.mean()) - full) < 4 * se + 1e-6, (float(d.mean()), full, se)
    assert float(d.std()) > 0  # a real subsample, not the full batch
    for mb in mbs:
        assert int(mb.select.sum(1).max()) <= 3
        n_ctx = mb.is_ctx.sum(1, keepdim=True)
        ctx_t = torch.where(mb.is_ctx, mb.t, torch.zeros_like(mb.t)).amax(1, keepdim=True)
        assert bool((mb.t[mb.select] > ctx_t.expand_as(mb.t)[mb.select]).all())
        assert bool((n_ctx >= 1).all())
    assert sum(mb.t.numel() for mb in mbs) < t.numel()


def test_training_with_subsampled_queries_runs_and_resumes_with_them_switched(tmp_path):
    """A run with max_queries trains (fewer tokens per step); max_queries may change on
    resume (it changes the estimate, not the loss)."""
    opts = {**TINY, "n_curves": 8 * 4, "out_dir": str(tmp_path), "max_queries": 4,
            "query_groups": 2}
    cfg = apply_overrides(TrainConfig(), opts)
    last = Trainer(cfg).run(max_steps=2, progress=False)
    assert last["tokens_per_s"] / last["curves_per_s"] < 100  # tokens per curve
    # expected targets may be switched on resume too (the same objective)
    last = Trainer(apply_overrides(cfg, {"max_queries": 0, "expected_targets": True})
                   ).run(progress=False)
    assert last["step"] == 4
    assert last["tokens_per_s"] / last["curves_per_s"] == pytest.approx(100)
    with pytest.raises(ValueError, match="query_groups"):
        apply_overrides(TrainConfig(), {"query_groups": 0})


def test_refit_tails_changes_only_the_tails_and_fits_them_to_the_prior(tmp_path):
    """`curvecast refit-tails`: a copy whose outer borders give the tails the prior's
    maximum-likelihood scales; every other tensor and every inner density is unchanged, the
    prior's values beyond the inner borders become likelier, the record names the source."""
    from pfn.bar import fit_tail_scales
    from pfn.io import load_model, save_model
    from pfn.model import PFN, PFNConfig
    from prior import get_prior
    from train.export import refit_tails

    torch.manual_seed(0)
    cfg = PFNConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, n_buckets=40, encoder_hidden=8)
    y = get_prior("lcpfn").sample(300, torch.Generator().manual_seed(3)).y
    inner = torch.quantile(y.flatten(), torch.linspace(0.01, 0.99, 39))
    src = PFN(cfg, torch.cat([inner[:1] - 1.5, inner, inner[-1:] + 2.0])).eval()
    sha0 = save_model(src, tmp_path / "src", {"prior": "lcpfn"})
    sha1, rec = refit_tails(tmp_path / "src", tmp_path / "out", n_curves=2000, seed=5)
    new, conf = load_model(tmp_path / "out")  # the new sha256 is checked on load
    assert sha1 != sha0 and conf["meta"]["tails"] == rec and rec["source_sha256"] == sha0
    fit = get_prior("lcpfn").sample(2000, torch.Generator().manual_seed(5)).y
    assert new.bar.tail_scales == pytest.approx(fit_tail_scales(fit, src.bar.borders), rel=1e-4)
    assert rec["before"] == pytest.approx(list(src.bar.tail_scales))
    s0, s1 = src.state_dict(), new.state_dict()
    for k in s0:
        if k != "bar.borders":
            assert torch.equal(s0[k], s1[k]), k
    assert torch.equal(s0["bar.borders"][1:-1], s1["bar.borders"][1:-1])
    logits = torch.randn(len(y.flatten()), 40, generator=torch.Generator().manual_seed(0))
    v = y.flatten()
    b = src.bar.borders
    tail = (v < b[1]) | (v > b[-2])
    assert int(tail.sum()) > 0
    ld0, ld1 = src.bar.log_density(logits, v), new.bar.log_density(logits, v)
    assert torch.equal(ld0[~tail], ld1[~tail])
    assert float(ld1[tail].mean()) > float(ld0[tail].mean()) + 0.5
    with pytest.raises(ValueError, match="too few"):
        refit_tails(tmp_path / "src", tmp_path / "bad", n_curves=10)


def test_trainable_freezes_everything_else(tmp_path):
    """trainable="gauss": a warm start grows the Gaussian head and trains it alone; the body
    and the bar head keep their source's values exactly, and an unknown prefix is refused
    with the model's module names."""
    src_dir = tmp_path / "src"
    cfg = apply_overrides(TrainConfig(), {**TINY, "n_curves": 16, "out_dir": str(src_dir)})
    Trainer(cfg).run(progress=False)
    warm = apply_overrides(cfg, {"init_from": str(src_dir), "model.gauss_head": True,
                                 "trainable": "gauss", "n_curves": 32, "seed": 4,
                                 "ema_decay": 0.9, "out_dir": str(tmp_path / "warm")})
    tr = Trainer(warm)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.run(progress=False)
    after = dict(tr.model.named_parameters())
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed and all(n.startswith("gauss.") for n in changed), changed
    assert all(bool(torch.isfinite(after[n]).all()) for n in changed)
    assert sorted(tr.ema) == sorted(n for n in before if n.startswith("gauss."))
    with pytest.raises(ValueError, match=r"trainable: .*'gaus'.*modules are \[.*'blocks'"):
        Trainer(apply_overrides(warm, {"trainable": "gaus", "out_dir": str(tmp_path / "x")}))
