"""The access log sink: the event loop hands lines over, a writer thread does the blocking writes.

A write to stdout blocks when journald (or whatever reads the pipe) stalls, and a write to a file
blocks when its disk does; either would stop the whole event loop, and with it every connection.
So the loop only appends to a queue, and one daemon thread writes.  The queue is bounded in bytes:
when the sink cannot keep up, whole batches of lines are dropped and counted
(`sidecar_proxy_access_log_dropped_total`) instead of growing memory or stalling traffic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from json.encoder import encode_basestring_ascii as json_str  # what json.dumps uses (ensure_ascii)

log = logging.getLogger("sidecar_proxy")

# bytes waiting for the writer before new lines are dropped (about 40,000 lines); the proxy passes
# Config.access_log_queue (SIDECAR_PROXY_ACCESS_LOG_QUEUE)
QUEUE_LIMIT = 8 << 20


# The loop hands lines to the writer thread in batches: when this many are waiting, or LOG_DELAY seconds
# after the first of them (Server.run). One hand-over per connection cost a thread wake-up (futex calls
# and a write) per connection at low concurrency.
LOG_BATCH = 256
LOG_DELAY = 0.05

_second = [-1, ""]  # the last whole second formatted, and its text (lines of one second share it)


def entry_line(t0: float, direction: str, src: str, dst: str | None, bytes_in: int, bytes_out: int,
               duration_ms: float, reason: str) -> str:
    """One access-log line, byte for byte what json.dumps of the entry dict (separators "," and ":")
    gives, without building the dict or a datetime: the connection's hot path runs this per connection.

    start_time is UTC with milliseconds, as datetime.fromtimestamp(t0, utc).isoformat("milliseconds")
    writes it: microseconds rounded half-even, then truncated to milliseconds."""
    sec = int(t0)
    usec = round((t0 - sec) * 1e6)
    if usec >= 1000000:
        sec += 1
        usec -= 1000000
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return (f'{{"start_time":"{_second[1]}.{usec // 1000:03d}Z","direction":{json_str(direction)},'
            f'"src":{json_str(src)},"dst":{"null" if dst is None else json_str(dst)},'
            f'"bytes_in":{bytes_in!r},"bytes_out":{bytes_out!r},"duration_ms":{round(duration_ms, 3)!r},'
            f'"reason":{json_str(reason)}}}')


class AccessLog:
    """One open sink ("-" = stdout, else a file opened for append) with its writer thread."""

    def __init__(self, path: str, limit: int = QUEUE_LIMIT, whole_lines: bool = False) -> None:
        self.path = path
        # several processes on one sink (workers): write whole lines, at most PIPE_BUF bytes at a time
        self.whole_lines = whole_lines
        if path == "-":
            self.fd = 1
            self.own_fd = False
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.own_fd = True
        self.limit = limit
        self.queue: deque[bytes] = deque()
        self.queued = 0  # bytes in the queue plus the batch being written
        self.write_errors = 0
        self.closing = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="access-log", daemon=True)
        self.thread.start()

    def submit(self, lines: list[str]) -> int:
        """Queue lines (without newlines); never blocks on the sink. Returns how many were dropped."""
        data = ("\n".join(lines) + "\n").encode()
        with self.cond:
            if self.queued + len(data) > self.limit:
                return len(lines)
            self.queue.append(data)
            self.queued += len(data)
            self.cond.notify()
        return 0

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:  # closing and nothing left
                    break
                batch = b"".join(self.queue)
                self.queue.clear()
            self.write_all(batch)
            with self.cond:
                self.queued -= len(batch)
                self.cond.notify_all()
        if self.own_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def write_all(self, data: bytes) -> None:
        if not self.whole_lines:
            self.write_view(memoryview(data))
            return
        # a write of up to PIPE_BUF bytes to a pipe is atomic, and so is one to a file opened O_APPEND
        # (or to journald's stream socket); only a single line longer than that goes alone, whole
        start, end = 0, len(data)
        while start < end:
            stop = start + select.PIPE_BUF
            if stop < end:
                cut = data.rfind(b"\n", start, stop)
                stop = cut + 1 if cut >= 0 else data.index(b"\n", start) + 1
            self.write_view(memoryview(data)[start:min(stop, end)])
            start = stop

    def write_view(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors <= 3 or self.write_errors % 1000 == 0:
                    log.error("access log write to %s failed: %s", self.path, exc)
                return
            view = view[n:]

    def close(self, wait: float = 0.0) -> None:
        """Write what is queued, then end the thread; wait up to `wait` seconds for that."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if wait > 0:
            self.thread.join(wait)

    def wait_empty(self, timeout: float) -> bool:
        """Block until everything queued so far is written (for tests and shutdown)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.queued == 0, timeout)
