"""A real curvecast server in a subprocess on a free port, for tests and benchmarks.

    with LocalServer(env={"CURVECAST_MAX_WAIT_US": "500"}) as srv:
        Client(srv.url).predict(...)

Useful beyond this repository too: integration tests of an HPO system against a real server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    def __init__(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 port: int | None = None, ready_timeout: float = 180.0,
                 api_key: str | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CURVECAST_")}
        self.env.update(env or {})
        self.ready_timeout = ready_timeout
        self.api_key = api_key or self.env.get("CURVECAST_API_KEY")
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="curvecast-server-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self._log_name = name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._log_name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> LocalServer:
        cmd = [sys.executable, "-m", "serve", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_ready(self) -> LocalServer:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {self.ready_timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful) and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def close(self) -> int:
        """Stop, then delete the log file; returns the exit status."""
        code = self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        return code

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> LocalServer:
        return self.start().wait_ready()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._log.close()
        if et is None:
            self.log_path.unlink(missing_ok=True)
