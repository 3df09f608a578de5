"""The CLI end to end, through the installed `curvecast` console script."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "predict_request.json"


def cc(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pfn.cli", *args], capture_output=True, text=True,
                       input=input, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_predict_json_file_and_stdin():
    out = json.loads(cc("predict", str(EXAMPLE)).stdout)
    p0, p1 = out["predictions"]
    assert p0["query_epochs"] == [20.0, 30.0, 50.0] and len(p0["mean"]) == 3
    assert set(p0["quantiles"]) == {"0.05", "0.5", "0.95"}
    q = np.array([p0["quantiles"][k] for k in ("0.05", "0.5", "0.95")])
    assert (np.diff(q, axis=0) > 0).all()
    assert p1["query_epochs"] == [30.0]  # default: the horizon
    again = json.loads(cc("predict", "-", input=EXAMPLE.read_text()).stdout)
    assert again["predictions"] == out["predictions"]


def test_predict_csv():
    csv = "curve,epoch,value\na,1,0.30\na,2,0.41\na,3,0.45\nb,1,0.5\nb,4,0.62\n"
    out = json.loads(cc("predict", "-", "--horizon", "20", input=csv).stdout)
    assert len(out["predictions"]) == 2


def test_predict_user_error_is_clear():
    bad = {"curves": [{"epochs": [3, 2], "values": [0.1, 0.2], "horizon": 10}]}
    r = cc("predict", "-", input=json.dumps(bad), check=False)
    assert r.returncode == 2 and "curves[0].epochs" in r.stderr and "increasing" in r.stderr
    assert "Traceback" not in r.stderr


def test_sample_prior_file_format(tmp_path, real_curves_path):
    out = tmp_path / "p.npz"
    cc("sample-prior", "--n", "300", "--out", str(out), "--seed", "3")
    d, ref = np.load(out), np.load(real_curves_path)
    for k in ref.files:
        assert k in d.files and d[k].shape[0] == 300, k
    assert d["y"].shape == (300, 100) and (d["lengths"] == 100).all()
    again = tmp_path / "q.npz"
    cc("sample-prior", "--n", "300", "--out", str(again), "--seed", "3")
    assert np.array_equal(np.load(again)["y"], d["y"])


def test_eval_prior_and_file_json(tmp_path, real_curves_path):
    r = cc("eval", "--prior-curves", "40", "--curves", real_curves_path, "--max-curves", "60",
           "--filter", "all", "--filter", "nonflat", "--json")
    rows = json.loads(r.stdout)["rows"]
    keys = {"source", "cutoff", "method", "n_curves", "log_likelihood", "mae_final", "rmse_final",
            "coverage_50", "coverage_90", "above_90"}
    assert all(keys <= set(row) for row in rows)
    assert {row["method"] for row in rows} == {"pfn", "last_value", "power_law"}
    assert {row["cutoff"] for row in rows if row["source"] == "prior"} == {"10", "20", "40", "80"}
    assert any(row["source"].endswith("/nonflat") for row in rows)
    assert all(np.isfinite(row["log_likelihood"]) for row in rows)
    assert all(0 <= row["above_90"] <= 1 - row["coverage_90"] + 1e-9 for row in rows)
    md = cc("eval", "--prior-curves", "20").stdout
    assert md.startswith("| source | cutoff | method |")


def test_eval_decay_sources_send_the_flag_for_those_sources_only(real_curves_path):
    """--decay-sources marks one source's curves lr_decay=true: its pfn rows change (the
    default's decay branch), the other sources' rows and the baselines do not; a source the
    file lacks is refused by name."""
    args = ["eval", "--prior-curves", "0", "--curves", real_curves_path, "--max-curves", "80",
            "--json"]
    plain = json.loads(cc(*args).stdout)["rows"]
    told = json.loads(cc(*args, "--decay-sources", "opda").stdout)["rows"]
    key = lambda r: (r["source"], r["cutoff"], r["method"])  # noqa: E731
    before = {key(r): r["log_likelihood"] for r in plain}
    changed = {k for r in told if abs(r["log_likelihood"] - before[k := key(r)]) > 1e-9}
    assert changed and all(k[0] == "opda" and k[2] == "pfn" for k in changed)
    r = cc(*args, "--decay-sources", "opda,nope", check=False)
    assert r.returncode == 2 and "--decay-sources" in r.stderr and "nope" in r.stderr


def test_plot_writes_png(tmp_path):
    out = tmp_path / "fan.png"
    cc("plot", str(EXAMPLE), "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_train_cli_rejects_unknown_key(tmp_path):
    r = cc("train", "--nope=1", f"--out_dir={tmp_path}", check=False)
    assert r.returncode == 2 and "unknown config key 'nope'" in r.stderr


@pytest.mark.parametrize("cmd", ["predict", "eval", "plot", "sample-prior", "train", "export-run",
                                 "refit-tails"])
def test_help(cmd):
    assert "Usage" in cc(cmd, "--help").stdout


def test_eval_reference_mcmc_same_curves_both_methods():
    r = cc("eval", "--prior-curves", "0", "--reference", "mcmc", "--reference-curves", "3",
           "--mcmc-settings", "quick", "--json")
    out = json.loads(r.stdout)
    ref = [row for row in out["rows"] if row["source"] == "prior/mcmc-subset"]
    assert {(row["method"], row["cutoff"]) for row in ref} == {
        (m, c) for m in ("pfn", "mcmc") for c in ("10", "20", "40", "80")}
    assert all(row["n_curves"] == 3 and np.isfinite(row["log_likelihood"]) for row in ref)
    assert [d["cutoff"] for d in out["mcmc_diagnostics"]] == [10, 20, 40, 80]
    assert all(d["rhat_median"] > 0.9 for d in out["mcmc_diagnostics"])
    bad = cc("eval", "--prior-curves", "0", "--reference", "mcmc", "--mcmc-settings", "fast",
             check=False)
    assert bad.returncode != 0 and "unknown 'fast'" in bad.stderr and "gold" in bad.stderr


def test_export_and_refit_name_what_is_missing(tmp_path):
    r = cc("export-run", str(tmp_path / "nope"), str(tmp_path / "out"), check=False)
    assert r.returncode == 2 and "no checkpoint.safetensors in" in r.stderr
    r = cc("refit-tails", "nope", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "neither a shipped model" in r.stderr
    r = cc("refit-tails", "default", str(tmp_path / "out"), "--curves", "10", check=False)
    assert r.returncode == 2 and "too few" in r.stderr
    assert not (tmp_path / "out").exists()
