"""A real Prefect server started with `mmkd server` in its own PREFECT_HOME, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MMKD = str(Path(sys.executable).with_name("mmkd"))


def free_port() -> int:
    """Return a TCP port on loopback that is free at the moment of the call."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LiveServer:
    """A running server: its URLs, the environment that points clients at it, and its log."""

    port: int
    home: Path
    log: Path
    process: subprocess.Popen

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Return the environment for an mmkd or Prefect command that uses this server."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_SERVER_EPHEMERAL")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url, **extra)
        return env


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def live_server(folder: Path, *, startup_timeout: float = 180) -> Iterator[LiveServer]:
    """Start `mmkd server` on a free loopback port with PREFECT_HOME under `folder`, and stop it on exit."""
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_SERVER_EPHEMERAL")}
    env.update(PREFECT_HOME=str(home))
    # mmkd itself must switch usage statistics off and point the UI at this port.
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "PREFECT_UI_API_URL"):
        env.pop(name, None)
    with log.open("wb") as log_file:
        process = subprocess.Popen([MMKD, "server", "--port", str(port)], env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = LiveServer(port=port, home=home, log=log, process=process)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(server.api_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mmkd server did not come up on port {port}; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, *, grace: float = 20) -> None:
    """Stop a process started with start_new_session=True, and every process it started."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 and IPv6 addresses with a socket listening on `port`, read from /proc/net."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A is LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                # /proc stores each 32-bit word of the IPv6 address in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found
