"""The event loop: one edge-triggered epoll loop, configuration (apply, reload), timers, signals.

Every socket is non-blocking and registered once with EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, so the loop
never re-arms interest. The concerns live in their own modules, as mixins of Server: forwarding.py
(flows, buffers, teardown), listeners.py (binding, accepting), admin.py (admin HTTP).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from . import __version__, netutil
from .accesslog import LOG_BATCH, AccessLog
from .activation import ActivationError, Inherited
from .admin import Admin, AdminConn
from .config import Config, ConfigError, build
from .forwarding import BUF_KEEP, CONNECTING, EPOLLIN, OPEN, POOL_KEEP, BufferPool, Conn, Flow, PipePool
from .listeners import Listener, Listeners, listener_specs
from .metrics import Metrics

log = logging.getLogger("sidecar_proxy")

# signals a supervisor blocks around fork(); its worker unblocks them once its own handlers are set
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
PUBLISH_EVERY = 0.05  # a worker publishes its figures (workers.py) at most this often after a change,
PUBLISH_IDLE = 0.25  # and this often when nothing changed (its supervisor waits for a publication newer
# than a /stats or /metrics request, so that the answer counts every connection that ended before it)


class Server(Listeners, Admin):
    extra_signals: tuple[int, ...] = ()  # handled besides SIGTERM, SIGINT, SIGHUP (the supervisor: SIGCHLD)

    def __init__(self, cfg: Config, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.metrics = Metrics()
        self.ep = select.epoll()
        self.now = time.monotonic()
        self.conns: dict[int, tuple[Conn, bool]] = {}  # fd -> (conn, is_client_side)
        self.connecting: set[Conn] = set()
        self.active = 0
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.listeners: dict[tuple[str, int, int, bool], Listener] = {}
        self.paused: set[Listener] = set()
        self.admin_paused = False
        self.admin_sock: socket.socket | None = None
        self.admin_conns: dict[int, AdminConn] = {}
        # the forwarding technique and sizes are fixed for the process (environment, not reloaded)
        self.splice = cfg.forward == "splice" and hasattr(os, "splice")
        self.pump_impl = self.pump_splice if self.splice else self.pump_copy
        self.pipes = PipePool(cfg.pipe_size, POOL_KEEP, cfg.buffer_budget)
        self.buffers = BufferPool(cfg.copy_buf, BUF_KEEP, cfg.buffer_budget)
        self.waiters: collections.deque[Flow] = collections.deque()  # flows waiting for the budget
        self.local = netutil.LocalAddresses()
        self.ready = False
        self.draining = False
        self.drain_deadline = 0.0
        self.stopping = False
        self.signals: list[int] = []  # signal numbers, appended by the handler
        self.log_lines: list[str] = []
        self.log_due = 0.0
        self.access: AccessLog | None = None
        self.own_ports: set[int] = set()
        self.pt_v4: str | None = None
        self.pt_v6: str | None = None
        self.started = time.time()
        self.sig_r = self.sig_w = -1
        self.inherited = Inherited([])  # sockets passed by systemd (run() takes them)
        self.listen_events = EPOLLIN
        # a worker (workers.py): its supervisor's pid, and where it publishes its figures; a worker takes
        # its listeners from the supervisor and serves no admin or metrics endpoint
        self.parent = 0
        self.publish: Callable[[], None] | None = None

    # ------------------------------------------------------------------ setup / config
    def apply(self, cfg: Config, initial: bool) -> None:
        """Bind what the config needs; on failure leave the previous state untouched."""
        wanted = listener_specs(cfg)
        new: dict[tuple[str, int, int, bool], Listener] = {}
        admin: socket.socket | None = None
        admin_fam = socket.AF_INET6 if ":" in cfg.admin_address else socket.AF_INET
        admin_changed = initial or (cfg.admin_address, cfg.admin_port) != (self.cfg.admin_address,
                                                                           self.cfg.admin_port)
        # a listener that goes away but whose port a new one needs (mode change, swapped ports) must
        # close first; it is rebound if the new configuration cannot be applied
        needed = {(spec[1], spec[2]) for spec in wanted if spec not in self.listeners}
        if admin_changed:
            needed.add((admin_fam, cfg.admin_port))
        early = [lst for spec, lst in self.listeners.items()
                 if spec not in wanted and (lst.family, lst.port) in needed]
        for lst in early:
            self.close_listener(lst)
        metrics: tuple[bool, socket.socket | None] = (False, None)
        try:
            for spec in wanted:
                if spec in self.listeners:
                    continue
                new[spec] = self.bind_listener(spec)
            if admin_changed and not self.parent:
                admin = netutil.listen_socket(admin_fam, cfg.admin_address, cfg.admin_port, False, 128)
            if not self.parent:
                metrics = self.metrics_bind(cfg)
            # stdout stays one sink (two writer threads could interleave partial writes); a file is
            # reopened on every reload, which is what log rotation needs
            keep = self.access is not None and cfg.access_log == "-" and self.access.path == "-"
            access = self.access if keep else self.open_access_log(cfg.access_log, cfg.access_log_queue)
        except OSError:
            for lst in new.values():
                self.close_listener(lst)  # (a passed socket goes back to the pool)
            if admin is not None:
                admin.close()
            if metrics[1] is not None:
                metrics[1].close()
            for old in early:
                try:
                    self.add_listener(self.bind_listener(old.spec))
                except OSError as exc:
                    log.error("cannot rebind %s listener on port %d: %s", old.direction, old.port, exc)
            raise
        # commit
        for spec, lst in list(self.listeners.items()):
            if spec not in wanted:
                self.close_listener(lst)
        for lst in new.values():
            self.add_listener(lst)
        if admin is not None:
            if self.admin_sock is not None:
                self.handlers.pop(self.admin_sock.fileno(), None)
                self.ep.unregister(self.admin_sock)
                self.admin_sock.close()
            self.admin_sock = admin
            self.ep.register(admin.fileno(), EPOLLIN)
            self.handlers[admin.fileno()] = self.admin_accept
        self.metrics_commit(cfg, *metrics)
        if self.access is not None and self.access is not access:
            self.flush_access_log()
            self.access.close()  # its thread writes what is queued, then closes a file (not stdout)
        self.access = access
        self.cfg = cfg
        self.buffers.set_budget(cfg.buffer_budget)
        self.pipes.budget = cfg.buffer_budget
        self.own_ports = {cfg.inbound_port, cfg.outbound_port, cfg.admin_port}
        if cfg.metrics_address:
            self.own_ports.add(cfg.metrics_port)
        self.local.clear()
        v4, v6 = cfg.passthrough_source_v4, cfg.passthrough_source_v6
        self.pt_v4 = v4 if netutil.can_bind(socket.AF_INET, v4) else None
        self.pt_v6 = v6 if netutil.can_bind(socket.AF_INET6, v6) else None
        if self.pt_v4 is None:
            log.warning("passthrough source %s is not assigned here; inbound upstream source left unbound",
                        cfg.passthrough_source_v4)
        logging.getLogger().setLevel(cfg.log_level.upper())

    def open_access_log(self, path: str, limit: int) -> AccessLog | None:
        # workers share the sink: each write is whole lines of at most PIPE_BUF bytes, which the kernel
        # never interleaves with another process's writes
        return AccessLog(path, limit, whole_lines=bool(self.parent)) if path else None

    def reload(self) -> None:
        if self.load_new_config():
            log.info("configuration reloaded (%d active connections kept)", self.active)

    def load_new_config(self) -> bool:
        """Validate and apply the file (a bad one changes nothing, and says why); False if refused."""
        if self.draining:
            log.warning("reload ignored while draining")
            return False
        try:
            cfg = build(self.config_path, self.overrides)
            self.check_reload(cfg)
            self.apply(cfg, initial=False)
        except (ConfigError, OSError) as exc:
            self.reload_failed(str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - no file may stop the proxy: keep running, say why
            self.reload_failed(f"{type(exc).__name__}: {exc}"[:500])
            return False
        self.metrics.reloads += 1
        return True

    def check_reload(self, cfg: Config) -> None:
        """Raise ConfigError for what the running process cannot take on a reload (workers.py)."""

    def reload_failed(self, why: str) -> None:
        self.metrics.reload_failures += 1
        self.metrics.reload_last_error = why
        log.error("reload failed, keeping the running configuration: %s", why)

    # ------------------------------------------------------------------ timers
    def sweep(self) -> None:
        now = self.now
        if self.parent and os.getppid() != self.parent and not self.draining:
            log.warning("worker: the supervisor (pid %d) is gone, draining", self.parent)
            self.begin_drain()
        if self.paused:
            for lst in self.paused:
                if self.listeners.get(lst.spec) is lst:
                    with contextlib.suppress(OSError, ValueError):
                        self.ep.register(lst.fd, self.listen_events)
            self.paused.clear()
        if self.admin_paused and self.admin_sock is not None:
            self.admin_paused = False
            with contextlib.suppress(OSError, ValueError):
                self.ep.modify(self.admin_sock.fileno(), EPOLLIN)
        if self.metrics_paused:
            self.metrics_resume()
        if self.connecting:
            limit = self.cfg.connect_timeout
            for conn in [c for c in self.connecting if now - c.t_connect >= limit]:
                self.metrics.error("connect_timeout")
                self.finish(conn, "connect_timeout", rst_client=True, rst_upstream=True)
        idle = self.cfg.idle_timeout
        expired = [c for c, side in self.conns.values() if side and now - c.last >= idle]
        for conn in expired:
            self.metrics.error("idle_timeout")
            self.finish(conn, "idle_timeout")
        for fd, ac in list(self.admin_conns.items()):
            if now >= ac.deadline:
                self.admin_close(fd)
        waiters = self.waiters
        if waiters and not (self.pipes if self.splice else self.buffers).room():
            # nothing was woken, so closed connections still sit in the queue: drop them
            live = [f for f in waiters if f.conn.state == OPEN and not f.done]
            if len(live) != len(waiters):
                waiters.clear()
                waiters.extend(live)

    # ------------------------------------------------------------------ main loop
    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def on_signal_fd(self, _events: int) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.sig_r, 64):
                pass

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = self.now + self.cfg.drain_timeout
        for lst in list(self.listeners.values()):
            self.close_listener(lst)
        if self.parent:  # a worker closes its copies of the supervisor's sockets, as one process its own
            for _name, sock in self.inherited.socks:
                sock.close()
            self.inherited.socks.clear()
        log.info("draining: listeners closed, %d active connections, deadline %.1fs",
                 self.active, self.cfg.drain_timeout)

    def handle_signals(self, sigs: list[int]) -> None:
        for sig in sigs:
            if sig == signal.SIGHUP:
                self.reload()
            else:
                self.begin_drain()

    def finished(self) -> bool:
        return self.draining and (self.active == 0 or self.now >= self.drain_deadline)

    def started_up(self) -> None:
        """Called once everything is bound, before the loop (the supervisor forks its workers here)."""

    def run(self) -> int:
        raise_nofile_limit()
        try:
            if not self.parent:  # a worker's listeners come from its supervisor
                self.inherited = Inherited.from_environment()
        except ActivationError as exc:
            log.error("cannot start: socket activation: %s", exc)
            return 1
        if len(self.inherited) and not self.parent:
            log.info("socket activation: %d passed sockets (%s)", len(self.inherited),
                     self.inherited.describe())
        try:
            self.apply(self.cfg, initial=True)
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) + self.extra_signals:
            signal.signal(signum, self.on_signal)
        if self.parent:  # a worker's configuration comes from its supervisor, which replaces it to reload
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        self.ep.register(self.sig_r, EPOLLIN)
        self.handlers[self.sig_r] = self.on_signal_fd
        if len(self.inherited) and not self.parent:
            log.warning("passed sockets that no listener uses (kept open): %s",
                        self.inherited.describe())
        self.started_up()
        self.ready = True
        log.info("sidecar-proxy %s ready: mode=%s inbound=%d outbound=%d admin=%s:%d forwarding=%s",
                 __version__, self.cfg.mode, self.cfg.inbound_port, self.cfg.outbound_port,
                 self.cfg.admin_address, self.cfg.admin_port, "splice" if self.splice else "copy")
        self.flush_access_log()
        sys.stderr.flush()
        conns = self.conns
        handlers = self.handlers
        poll = self.ep.poll
        next_sweep = time.monotonic() + 0.25
        on_sock_event = self.on_sock_event
        waiters = self.waiters
        publish = self.publish
        next_publish = published = 0.0
        pending = False  # (a worker) figures changed since its last publication
        while True:
            timeout = 0.25 if not self.draining else 0.05
            if pending:
                timeout = min(timeout, max(0.0, next_publish - self.now))
            if self.log_lines:
                timeout = min(timeout, max(0.0, self.log_due - self.now))
            events = poll(timeout, 1024)
            self.now = now = time.monotonic()
            # only a worker publishes (a single process or the supervisor would otherwise poll with a
            # zero timeout forever after its first event: a busy loop)
            if events and publish is not None:
                pending = True
            for fd, ev in events:
                hit = conns.get(fd)
                if hit is not None:
                    on_sock_event(hit[0], hit[1], ev)
                else:
                    h = handlers.get(fd)
                    if h is not None:
                        h(ev)
            if waiters:
                self.wake_waiters()
            # access-log lines go to the writer thread in batches (accesslog.LOG_BATCH / LOG_DELAY)
            log_lines = self.log_lines
            if log_lines and (len(log_lines) >= LOG_BATCH or now >= self.log_due):
                self.flush_access_log()
            if self.signals:
                sigs, self.signals = self.signals, []
                self.handle_signals(sigs)
            if publish is not None and now >= next_publish and (pending or now - published >= PUBLISH_IDLE):
                next_publish, published, pending = now + PUBLISH_EVERY, now, False
                publish()
            if now >= next_sweep:
                next_sweep = now + 0.25
                self.sweep()
                pending = publish is not None  # (timeouts may have closed connections)
            if self.finished():
                break
        if self.active:
            log.warning("drain deadline reached, closing %d connections", self.active)
            for conn, side in list(conns.values()):
                if side or conn.state == CONNECTING:
                    self.metrics.error("drain")
                    self.finish(conn, "drain", rst_client=True, rst_upstream=True)
            for conn in list(self.connecting):
                self.finish(conn, "drain", rst_client=True, rst_upstream=True)
        self.flush_access_log()
        if self.access is not None:
            self.access.close(wait=2.0)
        if publish is not None:
            publish()
        log.info("stopped")
        return 0


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20,
                                                        hard))
