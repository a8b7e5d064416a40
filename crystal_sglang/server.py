"""Start and stop a real SGLang server process on 127.0.0.1 (used by the demo, the tests and the benchmarks)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# --sleep-on-idle: an idle CPU scheduler otherwise busy-polls its sockets and takes a whole core from the
# model (and from every other server on a small machine); the poll it sleeps in wakes on the next request.
CPU_SERVER_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
                   "--sleep-on-idle")


def _terminate_with_parent() -> None:
    """Linux: the launcher gets SIGTERM when the thread that started it ends (a killed test run or benchmark),
    and SGLang's launcher then stops its scheduler and detokenizer; elsewhere the context manager's exit does."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_ATTEMPTS = 3


class ServerError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status when the server answered with an error


class SGLangServer:
    """`python -m sglang.launch_server` in its own process group, bound to 127.0.0.1.

    Use as a context manager: it returns once the server answers `/health`, and on exit terminates the whole
    process group (scheduler and detokenizer included) by the launcher's process id.
    """

    def __init__(
        self,
        model_path: str | Path,
        extra_args: list[str] | tuple[str, ...] = (),
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 300.0,
        port: int | None = None,
    ):
        self.model_path, self.extra_args = str(model_path), tuple(extra_args)
        self.chose_port = port is None  # a port chosen here is replaced if taken before the server binds it
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.started_in: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]  # fmt: skip

    def start(self) -> "SGLangServer":
        """Launch and wait for `/health`. Servers started side by side race for ports: SGLang picks its internal
        ports (free at that moment) while another server has not bound the port it was given yet. A port this
        object chose that is taken so is replaced by a fresh one (up to `PORT_ATTEMPTS` launches)."""
        for attempt in range(PORT_ATTEMPTS if self.chose_port else 1):
            if attempt:
                self.port = free_port()
            if self._launch():
                return self
        raise ServerError(f"127.0.0.1:{self.port} was in use by another process when the server bound it: pass a free "
                          f"port (or none, to have one chosen){self._tail()}")  # fmt: skip

    def _launch(self) -> bool:
        """True once the server answers `/health`; False (stopped) when its port was taken before it bound it."""
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        begin = time.monotonic()
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        while time.monotonic() - begin < self.start_timeout:
            if self._port_taken():
                self.stop()
                return False
            if self.process.poll() is not None:
                raise ServerError(f"the server exited with code {self.process.returncode} while starting{self._tail()}")
            if self._healthy():
                self.started_in = time.monotonic() - begin
                return True
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"the server did not answer /health within {self.start_timeout:.0f} s{self._tail()}")

    def _port_taken(self) -> bool:
        """The launcher logged that its HTTP port was in use (it does not exit then: the scheduler keeps it alive)."""
        if not self.log_path or not self.log_path.exists():
            return False
        return f"('127.0.0.1', {self.port}): address already in use" in self.log_path.read_text(errors="replace")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "; log tail:\n" + "\n".join(tail)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def post(self, path: str, payload: dict, timeout: float = 600.0) -> dict:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:
            raise ServerError(f"{path} answered {error.code}: {error.read().decode(errors='replace')}",
                              status=error.code) from error

    def runs_crystal_plugin(self) -> bool:
        """True when crystal-sglang's plugin is loaded: whatever `--kv-evict`, it refuses (HTTP 400) an eviction
        parameter it does not know, where stock SGLang ignores `custom_params` that no logit processor reads."""
        probe = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "custom_params": {"kv_probe": 1}}}
        try:
            self.post("/generate", probe)
        except ServerError as error:
            if error.status == 400:
                return True
            raise
        return False

    def metrics(self) -> dict[str, float]:
        """`/metrics` of a server started with `--enable-metrics`: each metric's value, summed over its label sets."""
        totals: dict[str, float] = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    def get(self, path: str, timeout: float = 60.0) -> dict | str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            body = response.read().decode()
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body

    def used_tokens(self) -> int:
        """KV slots in use per the scheduler's last load snapshot (start the server with
        `--load-snapshot-publish-interval 1` for one per batch)."""
        return sum(entry["num_used_tokens"] for entry in self.get("/v1/loads")["loads"])

    def pool_used(self) -> int:
        """KV slots in use now. An idle scheduler publishes no load snapshot; a one-token probe's prefill forces
        one. The probe's own slot is counted or not depending on when the snapshot lands, so the smaller of two
        probes' readings is taken: a leaked slot shows in both."""
        readings = []
        for _ in range(2):
            self.post("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
            readings.append(self.used_tokens())
        return min(readings)

    def pool_used_when_drained(self, timeout: float = 60.0) -> int:
        """Slots still in use once aborted or finishing requests have had time to release theirs."""
        deadline = time.monotonic() + timeout
        used = self.pool_used()
        while used and time.monotonic() < deadline:
            time.sleep(0.5)
            used = self.pool_used()
        return used

    def flush_prefix_cache(self, timeout: float = 60.0) -> None:
        """Empty the prefix cache; SGLang refuses while requests run, so retry until they have drained."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/flush_cache")
                return
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
