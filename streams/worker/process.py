"""Run one Faust worker process (what `lsti run` does), and start/stop worker subprocesses for the
demo, the benchmarks and the tests."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from streams.config import REPO, WorkerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_worker(s: WorkerSettings) -> int:
    """Blocking: create topics, build the app, hand control to Faust until SIGINT/SIGTERM."""
    import faust

    from streams.kafka.tools import ensure_topics
    from streams.worker.app import create_app

    logging.basicConfig(level=s.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.switch_interval_s > 0:
        sys.setswitchinterval(s.switch_interval_s)
    if not s.web_port:
        s.web_port = free_port()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(s.bootstrap, s.partitions, s.topics)
    app = create_app(s)
    # Our own logging config: with mode's default one, records of the `lsti.*` loggers were not printed.
    log_config = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"default": {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stdout"}},
        "root": {"level": s.loglevel.upper(), "handlers": ["default"]},
        "loggers": {"kafka": {"level": "WARNING"}, "faiss": {"level": "WARNING"}},
    }
    worker = faust.Worker(app, loglevel=s.loglevel, quiet=True, redirect_stdouts=False, logging_config=log_config)
    freeze_heap()
    worker.execute_from_commandline()
    return 0


def freeze_heap() -> None:
    """Everything loaded by now (torch, numpy, faust, the model, the index) lives as long as the worker: move
    it out of the garbage collector's reach. A full collection then scans only what the stream allocates;
    before, each walked the whole heap, 150-230 ms with every thread stopped (the progress line's `gc`)."""
    import gc

    gc.collect()
    gc.freeze()
    logging.getLogger("lsti.worker").info("froze %d objects out of the collector's scans", gc.get_freeze_count())


class WorkerProcess:
    """A real `lsti run` worker in a subprocess (own process group, log to a file)."""

    def __init__(self, bootstrap: str, artifact: Path, data_dir: Path, log_path: Path | None = None,
                 web_port: int | None = None, extra: list[str] | None = None, env: dict | None = None):
        self.web_port = web_port or free_port()
        self.data_dir = Path(data_dir)
        self.log_path = log_path or self.data_dir.with_suffix(".log")
        self.cmd = [sys.executable, "-m", "streams.cli", "run", "--bootstrap", bootstrap, "--artifact",
                    str(artifact), "--data-dir", str(data_dir), "--web-port", str(self.web_port), *(extra or [])]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO), start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Ready = the agent has partitions assigned (Faust logs its assignment table)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log:\n{self.tail()}")
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
            if "Ready" in text:
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout}s; log:\n{self.tail()}")

    def log_text(self) -> str:
        """This run's log (from where `start` found the file)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return self.proc.returncode

    def pause(self) -> None:
        """SIGSTOP: the process freezes as in a long GC pause or a VM stall (fault-injection tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown: for fault-injection tests."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
