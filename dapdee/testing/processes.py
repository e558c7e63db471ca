"""`dapdee serve planner|edge` as a subprocess on a fixed free 127.0.0.1 port: started with a
readiness wait, stopped cleanly (SIGTERM, then SIGKILL), restartable on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dapdee.testing.ports import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout holding the `dapdee` package


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `url` (GET, every 0.1 s) until it answers 200. RuntimeError naming `what` and the
    exit code when `proc` exits first, TimeoutError after `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up (exit code {proc.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready at {url} within {timeout:g} s")
        time.sleep(0.1)


def service_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any DAPDEE_* variable, plus `env`, with the checkout
    first on PYTHONPATH (so a copied tree runs its own code)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    out.update(env or {})
    out["PYTHONPATH"] = str(ROOT)
    return out


def end_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 20.0) -> None:
    """Send `sig` to a running `proc` and wait up to `wait_s` for it to exit; killed past that
    (a process that ignores its signal must not outlive a test)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ServiceProcess:
    """One `python -m dapdee.cli serve SERVICE --port PORT --log-level LEVEL ARGS...` process
    on a free 127.0.0.1 port chosen once (a restart reuses it). Settings come from `args` and
    `env` (added to a DAPDEE_*-free environment). `start()` waits until `ready_path` answers
    200; `stop()` sends SIGTERM, `kill()` SIGKILL (each escalating to SIGKILL after a wait).
    `niceness` > 0 runs it at that lower CPU priority (`nice -n`); `cpus` (a `taskset -c` list such
    as "1" or "0-2") keeps it and its threads on those CPUs; `log_file` (set before
    `start`) receives its standard error, appended (default: this process's). A context
    manager: `with ServiceProcess(...).start() as svc:` stops it at the end."""

    def __init__(
        self,
        service: str,
        args: list[str],
        ready_path: str,
        env: dict[str, str] | None = None,
        log_level: str = "warning",
        niceness: int = 0,
        cpus: str | None = None,
    ) -> None:
        self.service = service
        self.niceness = niceness
        self.cpus = cpus
        self.args = list(args)
        self.ready_path = ready_path
        self.port = free_port()
        self.env = dict(env or {})
        self.log_level = log_level
        self.log_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line `start()` runs."""
        cmd = [sys.executable, "-m", "dapdee.cli", "serve", self.service, "--port", str(self.port)]
        if self.niceness > 0:
            cmd = ["nice", "-n", str(self.niceness), *cmd]
        if self.cpus is not None:  # set before exec, so every thread the service starts inherits it
            cmd = ["taskset", "-c", self.cpus, *cmd]
        return cmd + ["--log-level", self.log_level, *self.args]

    def start(self, timeout_s: float = 90.0) -> ServiceProcess:
        """Start the process and wait until it is ready (killed again when it is not)."""
        if self.log_file is None:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=service_env(self.env))
        else:
            with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=service_env(self.env), stderr=log)
        try:
            wait_until_ready(self.url + self.ready_path, self.proc, timeout_s, f"{self.service} process")
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        if self.proc is not None:
            end_process(self.proc, sig)
        self.proc = None

    def __enter__(self) -> ServiceProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
