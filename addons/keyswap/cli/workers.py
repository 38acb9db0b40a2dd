"""`keyswap serve --workers N`: N gateway processes on one listen address, each a mitmdump
running the gateway with `keyswap_reuse_port` (SO_REUSEPORT), so the kernel spreads
connections between them. This module is the small supervisor above them: it starts
them, restarts one that dies (backing off when one dies at once, again and again; giving
up when none can start), and on SIGTERM or Ctrl-C stops each the way a single gateway
stops (it drains its requests in flight and flushes its activity log) before it exits.
It binds nothing itself."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import click

# A worker that exits sooner than this after its start died "at once": restarting it at
# the same pace would only spin. (A worker takes 1 to 4 s to start on a busy 2-core box.)
QUICK_EXIT_S = 10.0
# Waits before restarting a worker that died at once 1, 2, 3, ... times in a row.
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# That many deaths at once in a row, and no worker serving: the workers cannot start.
GIVE_UP_AFTER = 3
POLL_S = 0.1


def cores() -> int:
    """The CPUs this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def parse_workers(value: str) -> int:
    """`auto` (one per core) or a whole number, 1 or more."""
    text = value.strip().lower()
    if text == "auto":
        return cores()
    if not text.isdigit():
        raise ValueError(f"'{value}' is not a number of workers: give a whole number, or auto")
    count = int(text)
    if count < 1:
        raise ValueError("at least 1 worker is needed (or auto: one per core)")
    return count


def workers_value(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """click's side of `parse_workers`: a callback, not a ParamType, which only newer
    clicks let a type checker parameterize."""
    try:
        return parse_workers(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


class WorkersFailed(Exception):
    """The workers could not start; the message says which and how they ended."""


@dataclass
class Worker:
    """One slot of the pool: its current process, or when it is due to start again."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0  # in a row
    restart_at: float = 0.0

    def serving(self, now: float) -> bool:
        alive = self.proc is not None and self.proc.poll() is None
        return alive and now - self.started >= QUICK_EXIT_S


class Supervisor:
    """Keeps `count` processes of `command` running until SIGTERM or SIGINT."""

    def __init__(
        self, command: list[str], count: int, say: Callable[[str], None] | None = None
    ) -> None:
        self.command = command
        self.workers = [Worker(n) for n in range(1, count + 1)]
        self.say = say or _say
        self.stop_signal: int | None = None
        self._in_child = _stop_with_supervisor()

    def run(self) -> int:
        """Supervise until asked to stop; the exit status (0: every worker stopped cleanly).
        Raises WorkersFailed when no worker can start."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for worker in self.workers:
                self._start(worker)
            while self.stop_signal is None:
                self._tend(time.monotonic())
                time.sleep(POLL_S)
            self.say(f"{signal.Signals(self.stop_signal).name}: stopping the workers")
            return self._stop_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def _tend(self, now: float) -> None:
        for worker in self.workers:
            if worker.proc is not None and (code := worker.proc.poll()) is not None:
                self._exited(worker, code, now)
            if worker.proc is None and now >= worker.restart_at and self.stop_signal is None:
                self._start(worker)
        stuck = [w for w in self.workers if w.quick_exits >= GIVE_UP_AFTER]
        if stuck and not any(w.serving(now) for w in self.workers):
            self._stop_all()
            raise WorkersFailed(
                f"worker {stuck[0].number} exited within {QUICK_EXIT_S:.0f} s of starting "
                f"{stuck[0].quick_exits} times in a row and no worker is serving: giving up "
                "(the workers' output above says why; e.g. an invalid option, or the port "
                "held by a program that does not share it)"
            )

    def _start(self, worker: Worker) -> None:
        again = worker.started > 0
        worker.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            # A process group of its own: Ctrl-C at a terminal reaches the supervisor
            # alone, which stops each worker with one SIGTERM (a worker still starting
            # would die of a SIGINT with a traceback).
            process_group=0,
            preexec_fn=self._in_child,
        )
        worker.started = time.monotonic()
        what = "restarted" if again else "started"
        self.say(f"worker {worker.number} {what}: pid {worker.proc.pid}")

    def _exited(self, worker: Worker, code: int, now: float) -> None:
        assert worker.proc is not None
        pid, ran = worker.proc.pid, now - worker.started
        worker.proc = None
        if ran < QUICK_EXIT_S:
            worker.quick_exits += 1
            wait = BACKOFF_S[min(worker.quick_exits, len(BACKOFF_S)) - 1]
        else:
            worker.quick_exits, wait = 0, 0.0
        worker.restart_at = now + wait
        then = f"restarting in {wait:g} s" if wait else "restarting"
        self.say(f"worker {worker.number} (pid {pid}) {ended(code)} after {ran:.1f} s; {then}")

    def _stop_all(self) -> int:
        """SIGTERM to every worker, then wait for each: it drains and flushes first."""
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for worker in running:
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)
        status = 0
        for worker in self.workers:
            if worker.proc is None:
                continue
            code = worker.proc.wait()
            # Killed by the SIGTERM itself: it came before mitmdump handled signals, so
            # before it listened; nothing was in flight.
            if code not in (0, -signal.SIGTERM):
                self.say(f"worker {worker.number} (pid {worker.proc.pid}) {ended(code)}")
                status = 1
            worker.proc = None
        return status


def ended(code: int) -> str:
    """How a process ended, from Popen's returncode."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _say(message: str) -> None:
    # mitmdump's own time stamp, so the lines sort in with the workers' own output
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    click.echo(f"[{stamp}] keyswap serve: {message}", err=True)


def _stop_with_supervisor() -> Callable[[], None] | None:
    """On Linux, a worker gets SIGTERM when the supervisor dies, however it died (even
    by SIGKILL): an orphan would keep serving on the shared port next to the workers of
    the next `keyswap serve`, with nobody to stop it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def in_child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child
