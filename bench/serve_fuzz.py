"""Property-based fuzzing of `curvecast serve` against its own OpenAPI spec (schemathesis CLI).

Starts a real server and runs ``schemathesis run`` with every check except
``positive_data_acceptance`` (the schema cannot express every rule — sorted epochs, epochs <=
horizon — so some schema-valid bodies are rightly refused with 422). Phases: coverage, fuzzing
(``--examples`` per operation, valid and invalid data) and stateful. Prints schemathesis' summary
(test cases generated, failures); exit status 0 means no failure and no server error.

    python bench/serve_fuzz.py [--examples 100] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from serve.testing import LocalServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=100, help="max examples per operation")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-time", type=int, default=900, help="seconds")
    a = ap.parse_args()
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        sys.exit("schemathesis is not installed (pip install 'curvecast[test]')")
    env = {"CURVECAST_THREADS": "1", "CURVECAST_LOG_LEVEL": "warning"}
    with LocalServer(env=env) as srv, tempfile.TemporaryDirectory() as tmp:
        cmd = [exe, "run", f"{srv.url}/openapi.json", "--checks", "all", "--exclude-checks",
               "positive_data_acceptance", "-n", str(a.examples), "--seed", str(a.seed),
               "--workers", "1", "--no-color", "--generation-database", "none",
               "--max-time", str(a.max_time), "--request-timeout", "60",
               "--report-dir", tmp]
        # as tests/test_serve.py: a body over the size limit is rightly refused with 413
        Path(tmp, "schemathesis.toml").write_text(
            '[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", "403", "404", '
            '"405", "406", "409", "413", "415", "422", "428", "429", "5xx"]\n')
        print("$", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=tmp, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        alive = srv.proc is not None and srv.proc.poll() is None
        log = srv.log()
        n500 = log.count("unhandled error")
        print(f"\nserver alive after fuzzing: {alive}; unhandled errors logged: {n500}")
        sys.exit(r.returncode or (0 if alive and n500 == 0 else 1))


if __name__ == "__main__":
    main()
