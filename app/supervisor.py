"""Keep the worker that `optiforge serve` runs beside the API alive.

If it dies (OOM killer, a crash in a native library), it is started again after a short pause,
and the sweeper in the new worker re-queues the job it was running once its lease expires.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading

logger = logging.getLogger(__name__)
_RESTART_PAUSE_S = 2.0


def _die_with_parent() -> None:
    """In the worker child: get SIGTERM when `serve` dies, even by SIGKILL (Linux), so none is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerSupervisor:
    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, env
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent)
        logger.info("worker started beside the API (pid %d)", self.process.pid)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            assert self.process is not None
            code = self.process.wait()
            if self._stopping.wait(_RESTART_PAUSE_S):
                return
            self.restarts += 1
            logger.error(
                "the worker exited with code %s; starting a new one (restart %d)", code, self.restarts
            )
            self._spawn()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (Celery's warm shutdown lets a running job reach its next checkpoint), then SIGKILL."""
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
