"""A real API process (`optiforge serve --no-worker`) on a data dir of its own, that a test starts,
SIGKILLs and starts again, with its peak memory read from /proc and its own temp folder (TMPDIR),
so what it leaves there is what it left. Built from the pieces the live stacks use (conftest) and
the process helpers the benchmarks use (bench.processes)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from bench.processes import kill_group, reset_peak_rss, status_kib, stop
from tests.conftest import LiveStack, _base_env, _optiforge, _wait_ready, free_port


class ApiServer:
    def __init__(self, root: Path, **settings: str):
        self.data_dir, self.tmp = root / "data", root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.env = _base_env(self.data_dir) | {"TMPDIR": str(self.tmp)}
        self.env |= {f"OPTIFORGE_{name.upper()}": value for name, value in settings.items()}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "api.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*_optiforge(), "serve", "--no-worker", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
                start_new_session=True,
            )
        _wait_ready(LiveStack("api", self.url, self.env, self.data_dir, [self.process], [self.log]), timeout)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs."""
        assert self.process is not None
        kill_group(self.process, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def reset_peak(self) -> None:
        reset_peak_rss(self.pid)

    def peak_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def leftovers(self) -> list[str]:
        """Files an upload may leave: upload scratch, the store's staging, and the API's temp folder."""
        places = [self.data_dir / "scratch", self.data_dir / "artifacts" / ".staging", self.tmp]
        return sorted(
            str(path.relative_to(place.parent))
            for place in places
            if place.is_dir()
            for path in place.rglob("*")
            if not path.is_dir()
        )
