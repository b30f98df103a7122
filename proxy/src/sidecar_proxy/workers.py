"""Workers: one process per core behind a supervisor (the `workers` setting, when it is more than 1).

Python runs one thread of Python at a time, so one process forwards on one core. With N workers the
supervisor holds the listening sockets (passed by systemd or bound by itself) and forks N workers; each
worker inherits them and accepts on them from its own event loop (registered with EPOLLEXCLUSIVE, so a
new connection wakes one waiting worker, not all of them). The supervisor forwards nothing: it serves the
admin and metrics endpoints, re-forks a worker that dies (with a back-off), drains all of them on SIGTERM,
and reloads on SIGHUP by validating and applying the new file itself, then replacing the workers: new
ones take the (new) listeners, the old ones drain their connections, so no connection in flight is cut.

Figures: each worker publishes Metrics.snapshot() as JSON into its slot of a shared memory board (an
anonymous shared mmap made before fork), at most every PUBLISH_EVERY seconds after a change and every
PUBLISH_IDLE seconds otherwise; the supervisor sums the slots, plus the final figures of the workers that
have exited, so counters never go back. A read waits for a publication newer than itself from every worker,
so it counts every connection that ended before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import mmap
import os
import select
import signal
import struct
import time
from typing import Any

from .activation import Inherited
from .config import MIN_BUFFER_BUDGET, Config, ConfigError
from .listeners import listener_specs
from .metrics import Metrics
from .server import PUBLISH_IDLE, WORKER_SIGNALS, Server

log = logging.getLogger("sidecar_proxy")

SLOT = 16384  # bytes per worker slot: a header (sequence, length) and the JSON snapshot (~1.5 KB)
HEAD = struct.Struct("<QI")
BACKOFF_MAX = 5.0  # seconds before re-forking a worker that keeps dying
STABLE = 10.0  # a worker that ran this long resets its back-off
FRESH_WAIT = PUBLISH_IDLE + 0.1  # the longest a /stats or /metrics read waits for the workers' figures


# ---------------------------------------------------------------------------- how many
def quota_cpus(cpu_max: str) -> int | None:
    """CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") allows, rounded up; None: no limit."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cgroup_cpus(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest cgroup v2 CPU quota on the process's own cgroup and its ancestors; None: none set."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    limits = []
    parts = [p for p in path.split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        with contextlib.suppress(OSError):
            with open(os.path.join(root, *parts[:depth], "cpu.max")) as fh:
                cpus = quota_cpus(fh.read())
            if cpus is not None:
                limits.append(cpus)
    return min(limits) if limits else None


def available_cpus(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:  # a system-call filter may refuse it
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus(proc_cgroup, root)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def worker_count(setting: int | str) -> int:
    """The number of workers for the `workers` setting (validated by config.py)."""
    return available_cpus() if setting == "auto" else int(setting)


# ---------------------------------------------------------------------------- shared figures
class Board:
    """Slots in shared memory, one per live worker; a slot is written by one process (a seqlock)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * SLOT)  # anonymous and shared: forked workers write into it

    def clear(self, slot: int) -> None:
        HEAD.pack_into(self.mem, slot * SLOT, 0, 0)

    def write(self, slot: int, data: dict[str, Any]) -> None:
        raw = json.dumps(data, separators=(",", ":")).encode()[:SLOT - HEAD.size]
        off = slot * SLOT
        seq = HEAD.unpack_from(self.mem, off)[0]
        HEAD.pack_into(self.mem, off, seq + 1, 0)  # odd: being written
        self.mem[off + HEAD.size:off + HEAD.size + len(raw)] = raw
        HEAD.pack_into(self.mem, off, seq + 2, len(raw))

    def read(self, slot: int) -> dict[str, Any] | None:
        off = slot * SLOT
        for _try in range(100):
            seq, size = HEAD.unpack_from(self.mem, off)
            if seq % 2:
                time.sleep(0.0001)
                continue
            if seq == 0:
                return None
            raw = self.mem[off + HEAD.size:off + HEAD.size + size]
            if HEAD.unpack_from(self.mem, off)[0] == seq:
                with contextlib.suppress(ValueError):
                    data: dict[str, Any] = json.loads(raw)
                    return data
        return None


# ---------------------------------------------------------------------------- the supervisor
@dataclasses.dataclass
class Worker:
    pid: int
    slot: int
    position: int  # 0..N-1 for the current workers; -1 once replaced (draining)
    started: float


class Supervisor(Server):
    """Holds the listeners and the admin endpoints; forks, watches, reloads and drains the workers."""

    extra_signals = (signal.SIGCHLD,)

    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, Any], count: int) -> None:
        super().__init__(cfg, config_path, overrides)
        self.count = count
        self.board = Board(max(8, 4 * count))  # room for the current workers and replaced ones draining
        self.workers: dict[int, Worker] = {}  # pid -> worker
        self.due: dict[int, float] = {}  # position -> when to fork it again
        self.failures = [0] * count  # quick deaths in a row, per position (the back-off)
        self.retired = Metrics()  # final counters of workers that have exited
        self.killed = False
        self.metrics.workers = count

    # the supervisor accepts nothing itself: listeners are held for the workers, never polled here
    def add_listener(self, lst: Any) -> None:
        self.listeners[lst.spec] = lst

    def open_access_log(self, path: str, limit: int) -> None:
        return None  # the workers write the access log

    # ------------------------------------------------------------------ workers
    def started_up(self) -> None:
        log.info("supervisor: %d workers", self.count)
        for position in range(self.count):
            self.fork(position)

    def fork(self, position: int) -> None:
        used = {w.slot for w in self.workers.values()}
        slot = next(i for i in range(self.board.slots) if i not in used)
        self.board.clear(slot)
        # the child gets its own handlers before it takes a signal: block them across fork()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            try:
                pid = os.fork()
            except OSError as exc:  # (out of processes or memory: try again)
                log.error("cannot start worker %d: %s; trying again in 1s", position, exc)
                self.due[position] = self.now + 1.0
                return
            if pid == 0:
                code = 70
                try:
                    code = self.worker_main(slot)
                except BaseException:  # noqa: BLE001 - a worker never returns into the supervisor's code
                    log.exception("worker failed")
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.workers[pid] = Worker(pid, slot, position, self.now)
        log.info("worker %d started (pid %d)", position, pid)

    def worker_main(self, slot: int) -> int:
        """In the child: drop the supervisor's loop and endpoints, run a Server on the inherited listeners."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.ep.close()
        for fd in (self.sig_r, self.sig_w):
            os.close(fd)
        for sock in [self.admin_sock, self.metrics_sock] + [ac.sock for ac in self.admin_conns.values()]:
            if sock is not None:
                sock.close()
        # the buffer budget bounds the memory of all workers together (the unit's MemoryMax)
        budget = max(MIN_BUFFER_BUDGET, self.cfg.buffer_budget // self.count)
        cfg = dataclasses.replace(self.cfg, buffer_budget=budget)
        worker = Server(cfg, self.config_path, self.overrides)
        worker.parent = os.getppid()
        worker.listen_events = select.EPOLLIN | select.EPOLLEXCLUSIVE
        worker.inherited = Inherited([(lst.inherited or lst.direction, lst.sock)
                                      for lst in self.listeners.values()])
        board, pid = self.board, os.getpid()

        def publish() -> None:
            at = time.monotonic()  # (taken first: the snapshot holds everything counted before it)
            snap = worker.current_metrics().snapshot()
            snap.update(pid=pid, ready=worker.ready and not worker.draining, draining=worker.draining, at=at)
            board.write(slot, snap)

        worker.publish = publish
        return worker.run()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            last = self.board.read(w.slot)
            if last is not None:
                self.retired.absorb(last, gauges=False)
            self.board.clear(w.slot)
            how = (f"exit code {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
                   else f"signal {os.WTERMSIG(status)}")
            if w.position < 0 or self.draining:
                log.info("worker (pid %d) stopped: %s", pid, how)
                continue
            quick = self.now - w.started < STABLE
            self.failures[w.position] = self.failures[w.position] + 1 if quick else 0
            delay = min(BACKOFF_MAX, 0.1 * 2 ** (self.failures[w.position] - 1)) if quick else 0.0
            log.warning("worker %d (pid %d) died (%s); starting another in %.1fs",
                        w.position, pid, how, delay)
            self.due[w.position] = self.now + delay

    def sweep(self) -> None:
        super().sweep()
        if self.draining:
            return
        for position, when in list(self.due.items()):
            if self.now >= when:
                del self.due[position]
                self.fork(position)

    # ------------------------------------------------------------------ signals: reload, drain
    def handle_signals(self, sigs: list[int]) -> None:
        if signal.SIGCHLD in sigs:
            self.reap()
        super().handle_signals([s for s in sigs if s != signal.SIGCHLD])

    def reload(self) -> None:
        """Validate and apply the file here (a bad one changes nothing), then replace the workers."""
        if not self.load_new_config():
            return
        old = [w for w in self.workers.values() if w.position >= 0]
        for w in old:
            w.position = -1
        self.due.clear()
        for position in range(self.count):
            self.fork(position)
        for w in old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
        log.info("configuration reloaded: %d new workers, %d replaced ones drain their connections",
                 self.count, len(old))

    def check_reload(self, cfg: Config) -> None:
        """What workers cannot take on a reload, refused before anything changes."""
        if cfg.workers != self.cfg.workers:
            log.warning("workers changed from %s to %s: that takes effect at the next start",
                        json.dumps(self.cfg.workers), json.dumps(cfg.workers))
        free = self.board.slots - len(self.workers)
        if free < self.count:
            raise ConfigError(f"{len(self.workers) - self.count} replaced workers are still draining; "
                              "reload again when they are done")
        # a listener that changes in place (mode, or a port another listener had) would have to be
        # bound while replaced workers still hold the old socket
        ports = {(lst.family, lst.port): lst.spec for lst in self.listeners.values()}
        for spec in listener_specs(cfg):
            have = ports.get((spec[1], spec[2]))
            if have is not None and have != spec:
                raise ConfigError(f"the {spec[0]} listener on port {spec[2]} changes in place (was the "
                                  f"{have[0]} one{', TPROXY' if have[3] else ''}): with workers this needs "
                                  "a restart")

    def begin_drain(self) -> None:
        if self.draining:
            return
        super().begin_drain()
        for w in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)

    def finished(self) -> bool:
        if not self.draining:
            return False
        if self.workers and not self.killed and self.now >= self.drain_deadline + 5.0:
            log.warning("workers still running after the drain deadline: killing %d", len(self.workers))
            self.killed = True
            for w in self.workers.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
        if self.workers:
            self.reap()  # (a SIGCHLD may arrive between two polls)
        return not self.workers

    # ------------------------------------------------------------------ figures: sums over the workers
    def live(self) -> list[tuple[Worker, dict[str, Any] | None]]:
        return [(w, self.board.read(w.slot)) for w in sorted(self.workers.values(), key=lambda w: w.slot)]

    def is_ready(self) -> bool:
        if not self.ready or self.draining:
            return False
        current = [(w, snap) for w, snap in self.live() if w.position >= 0]
        return len(current) == self.count and all(snap and snap.get("ready") for _w, snap in current)

    def wait_fresh(self) -> None:
        """Wait until every worker has published after now (bounded: a stopped worker costs FRESH_WAIT)."""
        asked = time.monotonic()
        deadline = asked + FRESH_WAIT
        while True:
            stale = [w for w, snap in self.live() if snap is None or snap.get("at", 0.0) < asked]
            if not stale or time.monotonic() >= deadline:
                return
            time.sleep(0.002)

    def current_metrics(self) -> Metrics:
        self.wait_fresh()
        total = Metrics()
        total.absorb(self.retired.snapshot(), gauges=False)
        for _w, snap in self.live():
            if snap is not None:
                total.absorb(snap)
        own = self.metrics
        total.reloads, total.reload_failures, total.reload_last_error = (
            own.reloads, own.reload_failures, own.reload_last_error)
        total.admin_rejected, total.metrics_rejected = own.admin_rejected, own.metrics_rejected
        total.errors["accept"] += own.errors["accept"]  # the admin endpoints' accept errors
        total.buffer_budget = self.cfg.buffer_budget
        total.workers = self.count
        return total

    def extra_stats(self, stats: dict[str, Any]) -> None:
        rows = []
        for w, snap in self.live():
            snap = snap or {}
            rows.append({"pid": w.pid, "position": w.position if w.position >= 0 else None,
                         "ready": bool(snap.get("ready")),
                         "draining": w.position < 0 or bool(snap.get("draining")),
                         "connections_total": snap.get("connections_total", {}),
                         "connections_active": snap.get("connections_active", {})})
        stats["worker_processes"] = rows
