#!/usr/bin/python3
# Copyright: sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Probe traffic for the sidecar.intercept fleet playbooks (stdlib only, Python 3.7+).

Subcommands (each prints one JSON object on stdout and exits 0 unless the arguments are bad;
the playbook decides what counts as a failure):

  serve --port P                 the probe application: a tiny TCP echo service (systemd unit
                                 sidecar-probe.service); replies "sidecar-probe <hostname> <line>"
  snapshot --admin-port N        the proxy's counters (/stats) and the host's clock, taken before
                                 probing
  connect --host H --port P      open --count connections to H:P, send one line, read the reply
                                 (--as-gid G: as the proxy's GID, bypassing this host's own capture)
  evidence --admin-port N --since T --expect DIRECTION=IP:PORT ...
                                 wait until the proxy's counters grew and its access log (journal
                                 of sidecar-proxy.service) has a line per expectation with that
                                 direction and original destination
  local --admin-port N --port P  the whole check on this host alone: a temporary network namespace
                                 with a veth pair (link-local /30 that no address, route or --avoid
                                 network of the host overlaps); inbound probes from the namespace to
                                 the host's side of the pair (through PREROUTING, like a remote
                                 client), outbound probes from the host to a listener in the
                                 namespace (through OUTPUT, like an app), then the evidence for both;
                                 the namespace is removed before it exits (also on SIGTERM/SIGINT)
  cleanup                        remove the namespaces of `local` runs that are no longer running
                                 (a killed run's leftovers); `local` does this first, too
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator

# access-log reasons that mean the destination never answered (connect_refused is an answer: the
# path there and back works, only nothing listens, as on a peer that has no probe app yet)
FAILED_REASONS = ("connect_timeout", "connect_error", "original_dst", "loop", "limit")


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- serve
class _Echo(socketserver.StreamRequestHandler):
    timeout = 10

    def handle(self) -> None:
        try:
            line = self.rfile.readline(256).decode("utf-8", "replace").strip()
            reply = f"sidecar-probe {socket.gethostname()} {line}\n"
            self.wfile.write(reply.encode())
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(port: int, notify: bool = False) -> int:
    servers = []
    v6 = socket.has_ipv6
    if v6:
        try:
            class _Server6(_Server):
                address_family = socket.AF_INET6

                def server_bind(self) -> None:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    super().server_bind()

            servers.append(_Server6(("::", port), _Echo))
        except OSError:
            pass
    servers.append(_Server(("0.0.0.0", port), _Echo))
    if notify:  # bound and listening: the caller may connect now
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


# ----------------------------------------------------------------------------- proxy admin
def stats(admin_port: int, timeout: float = 3.0) -> dict:
    url = f"http://127.0.0.1:{admin_port}/stats"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def counters(admin_port: int) -> dict:
    try:
        return dict(stats(admin_port).get("connections_total", {}))
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}


def snapshot(admin_port: int) -> int:
    emit({"time": round(time.time() - 1.0, 3), "connections_total": counters(admin_port)})
    return 0


# ----------------------------------------------------------------------------- connect
@contextlib.contextmanager
def effective_ids(uid: int | None = None, gid: int | None = None) -> Iterator[None]:
    """Run the body with this effective UID and/or GID (root only), then restore both: a socket
    created meanwhile keeps them as its owner, which the capture rules' owner matches see."""
    saved = (os.getegid(), os.geteuid())
    try:
        if gid is not None:
            os.setegid(gid)
        if uid is not None:
            os.seteuid(uid)
        yield
    finally:
        os.seteuid(saved[1])
        os.setegid(saved[0])


def open_socket(host: str, port: int, timeout: float, as_gid: int | None) -> socket.socket:
    """Connect; with as_gid (root only) the socket is created with that effective GID, so that an
    owner match for the proxy's GID lets it pass this host's own outbound capture: an inbound probe
    then tests the target's inbound path only, not the sender's outbound path too."""
    if as_gid is None or os.geteuid() != 0:
        return socket.create_connection((host, port), timeout=timeout)
    with effective_ids(gid=as_gid):
        return socket.create_connection((host, port), timeout=timeout)


def connect(host: str, port: int, count: int, timeout: float, as_gid: int | None = None,
            no_data: bool = False) -> int:
    emit(connect_result(host, port, count, timeout, as_gid, no_data))
    return 0


def connect_result(host: str, port: int, count: int, timeout: float, as_gid: int | None = None,
                   no_data: bool = False) -> dict:
    results = []
    for i in range(count):
        t0 = time.monotonic()
        item = {"n": i, "ok": False, "reply": "", "error": ""}
        try:
            with open_socket(host, port, timeout, as_gid) as sock:
                item["local"] = "{}:{}".format(*sock.getsockname()[:2])
                if not no_data:  # connected is all a trace needs: then send nothing to the service
                    sock.sendall(b"probe-%d\n" % i)
                    sock.shutdown(socket.SHUT_WR)
                    data = b""
                    while len(data) < 4096:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    item["reply"] = data.decode("utf-8", "replace").strip()
                item["ok"] = True
        except OSError as exc:
            item["error"] = f"{type(exc).__name__}: {exc}"
        item["ms"] = round((time.monotonic() - t0) * 1000.0, 1)
        results.append(item)
    return {
        "target": f"{host}:{port}",
        "connected": sum(1 for r in results if r["ok"]),
        "replied": sum(1 for r in results if r["reply"].startswith("sidecar-probe")),
        "results": results,
    }


# ----------------------------------------------------------------------------- evidence
def journal_lines(since: float, unit: str) -> list:
    cmd = ["journalctl", "--no-pager", "-o", "cat", "-u", unit, "--since", f"@{int(since)}"]
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=15,
                             env={"LC_ALL": "C", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    entries = []
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "direction" in obj:
            entries.append(obj)
    return entries


def file_lines(path: str) -> list:
    """Access-log entries from a file the proxy writes (its access_log setting), oldest first."""
    entries = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and "direction" in obj:
                        entries.append(obj)
    except OSError:
        pass
    return entries


def evidence(admin_port: int, since: float, before: dict, expect: list, wait: float, unit: str,
             use_log: bool, log_file: str = "") -> int:
    emit(evidence_result(admin_port, since, before, expect, wait, unit, use_log, log_file))
    return 0


def evidence_result(admin_port: int, since: float, before: dict, expect: list, wait: float, unit: str,
                    use_log: bool, log_file: str = "") -> dict:
    wanted = []
    for spec in expect:
        direction, _sep, dst = spec.partition("=")
        wanted.append({"direction": direction, "dst": dst})
    need = {}
    for w in wanted:
        need[w["direction"]] = need.get(w["direction"], 0) + 1
    deadline = time.monotonic() + wait
    while True:
        now = counters(admin_port)
        delta = {}
        for d in need:
            try:
                delta[d] = int(now.get(d, 0)) - int(before.get(d, 0))
            except (TypeError, ValueError):
                delta[d] = 0
        counters_ok = "error" not in now and all(delta[d] >= n for d, n in need.items())
        found = []
        missing = []
        if use_log:
            entries = file_lines(log_file) if log_file else journal_lines(since, unit)
            for w in wanted:
                hit = [e for e in entries if e.get("direction") == w["direction"] and e.get("dst") == w["dst"]]
                good = [e for e in hit if e.get("reason") not in FAILED_REASONS]
                (found if good else missing).append(dict(w, lines=(good or hit)[-3:]))
        log_ok = not missing
        if (counters_ok and log_ok) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    problems = []
    if "error" in now:
        problems.append("proxy admin /stats unreachable: {}".format(now["error"]))
    for d, n in need.items():
        if delta.get(d, 0) < n:
            problems.append(f"{d} connection counter grew by {delta.get(d, 0)}, expected at least {n}")
    for m in missing:
        if m["lines"]:
            problems.append("{} connection to {} reached the proxy but got no answer upstream ({})".format(
                m["direction"], m["dst"], ", ".join(sorted({str(e.get("reason")) for e in m["lines"]}))))
        else:
            problems.append("no {} access-log line with dst={}".format(m["direction"], m["dst"]))
    return {
        "intercepted": not problems,
        "problems": problems,
        "counters_before": before,
        "counters_after": now,
        "delta": delta,
        "log_checked": use_log,
        "found": found,
    }


# ----------------------------------------------------------------------------- local (no peer host)
# The namespace and the host's end of the veth pair carry the PID of the run that made them, so a
# later run (or `cleanup`) can tell a killed run's leftovers from a run that is still going.
NETNS_PREFIX = "sidecar-probe-"
VETH_RE = re.compile(r"^spr(\d+)h$")
CANDIDATES = ipaddress.ip_network("169.254.0.0/16")
# never used: the cloud metadata address lives here
RESERVED = [ipaddress.ip_network("169.254.169.0/24")]
# IPv6 probe pairs (trace of an IPv6 inbound connection): a /64 of this fixed unique-local /48, chosen
# like the IPv4 /30 (by PID, skipping any network the host has an address or route in)
CANDIDATES6 = ipaddress.ip_network("fd5c:9e0b:7a41::/48")
ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def ip_cmd(*args: str, check: bool = True) -> str:
    out = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, timeout=30,
                         check=False)
    if check and out.returncode != 0:
        raise RuntimeError("ip {} failed: {}".format(" ".join(args), out.stderr.decode("utf-8", "replace").strip()))
    return out.stdout.decode("utf-8", "replace")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_netns(name: str) -> None:
    for pid in ip_cmd("netns", "pids", name, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip_cmd("netns", "del", name, check=False)


def sweep(prefix: str = NETNS_PREFIX) -> list:
    """Remove every probe namespace (and host-side veth) whose run is gone; returns their names."""
    removed = []
    for line in ip_cmd("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            _remove_netns(name)
            removed.append(name)
    for link in json.loads(ip_cmd("-j", "link", "show", check=False) or "[]"):
        m = VETH_RE.match(link.get("ifname", ""))
        if m and not _alive(int(m.group(1))):
            ip_cmd("link", "del", link["ifname"], check=False)
            removed.append(link["ifname"])
    return removed


# per family: the candidates, the size of a probe pair's network, the narrowest route that does not make
# its addresses used (a zeroconf 169.254.0.0/16 or an fc00::/7-wide route does not), the networks never
# used, and whether the last network of the candidates is left out (IPv4: its broadcast end)
PROBE_NETS = {
    "ipv4": {"candidates": CANDIDATES, "prefixlen": 30, "route_min": 24, "reserved": RESERVED, "skip_last": True},
    "ipv6": {"candidates": CANDIDATES6, "prefixlen": 64, "route_min": 48, "reserved": [], "skip_last": False},
}


def used_networks(family: str = "ipv4") -> list:
    """The host's networks of `family` a probe pair must not overlap: its addresses and specific routes."""
    spec = PROBE_NETS[family]
    opt, host_len = ("-6", 128) if family == "ipv6" else ("-4", 32)
    used = list(spec["reserved"])
    for link in json.loads(ip_cmd(opt, "-j", "addr", "show", check=False) or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.ip_network("{}/{}".format(a["local"], a.get("prefixlen", host_len)), strict=False))
    for route in json.loads(ip_cmd(opt, "-j", "route", "show", "table", "all", check=False) or "[]"):
        dst = route.get("dst", "")
        if dst in ("", "default") or not dst[:1].isalnum():
            continue
        try:
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/{host_len}", strict=False)
        except ValueError:
            continue
        if net.prefixlen >= spec["route_min"]:
            used.append(net)
    return used


def pick_network(avoid: list, seed: int, family: str = "ipv4") -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A probe pair's network of `family` (IPv4: a link-local /30, IPv6: a unique-local /64 of
    CANDIDATES6) that overlaps none of `avoid`, starting at a place given by `seed`."""
    spec = PROBE_NETS[family]
    cand, plen = spec["candidates"], spec["prefixlen"]
    subnets = 1 << (plen - cand.prefixlen)
    size = 1 << (cand.max_prefixlen - plen)
    for i in range(subnets):
        n = (seed * 4099 + i) % subnets
        net = ipaddress.ip_network((int(cand.network_address) + size * n, plen))
        if n == 0 or (spec["skip_last"] and n == subnets - 1) or any(
                net.overlaps(a) for a in avoid if a.version == net.version):
            continue
        return net
    raise RuntimeError("no free {} /{} for the probe namespace".format(
        "link-local" if family == "ipv4" else "unique-local", plen))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise _Stop(f"signal {signum}")


def local(admin_port: int, port: int, count: int, timeout: float, avoid: list, unit: str, use_log: bool,
          log_file: str = "", prefix: str = NETNS_PREFIX) -> int:
    emit(local_result(admin_port, port, count, timeout, avoid, unit, use_log, log_file, prefix))
    return 0


class ProbeNamespace:
    """A temporary network namespace with a veth pair to this host, on a free link-local /30.

    Named after this process (`sweep` tells a killed run's leftovers from a live one); used as a
    context manager, it is removed on the way out whatever happened. `name`, `host_ip` (this host's
    side of the pair), `ns_ip` (the namespace's side) and `network` are set once it exists; with
    ipv6=True the pair also gets a unique-local /64 (`host_ip6`, `ns_ip6`, `network6`; nodad, so
    usable at once).
    """

    def __init__(self, prefix: str = NETNS_PREFIX, avoid: list | None = None, ipv6: bool = False) -> None:
        pid = os.getpid()
        self.name, self.veth_host, self.veth_ns = f"{prefix}{pid}", f"spr{pid}h", f"spr{pid}n"
        self.prefix = prefix
        self.avoid = list(avoid or [])
        self.host_ip = self.ns_ip = self.network = ""
        self.ipv6 = ipv6
        self.host_ip6 = self.ns_ip6 = self.network6 = ""
        self.swept: list = []
        self.removed = False

    def __enter__(self) -> ProbeNamespace:
        self.swept = sweep(self.prefix)
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _create(self) -> None:
        pid = os.getpid()
        net = pick_network(used_networks() + [ipaddress.ip_network(a, strict=False) for a in self.avoid], pid)
        self.host_ip, self.ns_ip = (str(h) for h in list(net.hosts())[:2])
        self.network = str(net)
        try:
            ip_cmd("netns", "add", self.name)
        except RuntimeError as exc:
            hint = ("; network namespaces need CAP_SYS_ADMIN (a container: --cap-add SYS_ADMIN); site.yml and "
                    "verify.yml can probe from another host instead (sidecar_rollout_probe_peer)"
                    ) if "not permitted" in str(exc) else ""
            raise RuntimeError(f"{exc}{hint}") from None
        ip_cmd("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        ip_cmd("link", "set", self.veth_ns, "netns", self.name)
        ip_cmd("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        ip_cmd("link", "set", self.veth_host, "up")
        ip_cmd("-n", self.name, "link", "set", "lo", "up")
        ip_cmd("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns)
        ip_cmd("-n", self.name, "link", "set", self.veth_ns, "up")
        if self.ipv6:
            net6 = pick_network(used_networks("ipv6"), pid, "ipv6")
            self.host_ip6, self.ns_ip6 = str(net6.network_address + 1), str(net6.network_address + 2)
            self.network6 = str(net6)
            for ns, dev, addr in (([], self.veth_host, self.host_ip6), (["-n", self.name], self.veth_ns, self.ns_ip6)):
                ip_cmd(*ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")

    def exec_args(self) -> list:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def remove(self) -> None:
        # a second signal must not interrupt the removal: it is delivered (and raises) afterwards
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            _remove_netns(self.name)
            ip_cmd("link", "del", self.veth_host, check=False)
            self.removed = self.name not in ip_cmd("netns", "list", check=False).split()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _Signals:
    """SIGTERM/SIGINT/SIGHUP raise _Stop inside the block (so finally clauses run); restored after."""

    def __enter__(self) -> _Signals:
        self.old = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def local_result(admin_port: int, port: int, count: int, timeout: float, avoid: list, unit: str, use_log: bool,
                 log_file: str = "", prefix: str = NETNS_PREFIX) -> dict:
    """Probe both directions of this host's capture without a second host (see the module doc)."""
    pns = ProbeNamespace(prefix, avoid)
    name = pns.name
    out: dict = {"netns": name, "intercepted": False, "problems": []}
    listener = None
    try:
        with _Signals(), pns:
            out["swept"] = pns.swept
            host_ip, ns_ip = pns.host_ip, pns.ns_ip
            out.update(host_address=host_ip, netns_address=ns_ip, network=pns.network)
            me = [sys.executable, os.path.abspath(__file__)]
            try:
                listener = subprocess.Popen([*pns.exec_args(), *me, "serve", "--port", str(port), "--notify"],
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
                if listener.stdout is None or listener.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"the probe listener in {name} did not start on port {port}")
                before = counters(admin_port)
                since = time.time() - 1.0
                # inbound: a client in the namespace, like a remote host, to the host's side of the pair
                res = subprocess.run([*pns.exec_args(), *me, "connect", "--host", host_ip, "--port", str(port),
                                      "--count", str(count), "--timeout", str(timeout)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                     timeout=count * (timeout + 1) + 10, check=False)
                try:
                    out["inbound"] = json.loads(res.stdout.decode() or "{}")
                except ValueError:
                    out["inbound"] = {"replied": 0,
                                      "results": [{"error": res.stderr.decode("utf-8", "replace")[-300:]}]}
                # outbound: this host, like an app, to the listener in the namespace
                out["outbound"] = connect_result(ns_ip, port, count, timeout)
                ev = evidence_result(admin_port, since, before,
                                     [f"outbound={ns_ip}:{port}", f"inbound={host_ip}:{port}"],
                                     timeout, unit, use_log, log_file)
                out["evidence"] = ev
                out["delta"] = ev["delta"]
                problems = list(ev["problems"])
                for direction, src, dst in (("inbound", name, host_ip), ("outbound", "this host", ns_ip)):
                    r = out[direction]
                    if int(r.get("replied", 0)) < count:
                        err = next((x.get("error") for x in r.get("results", []) if x.get("error")), "") or "no reply"
                        problems.append(f"{direction} probe from {src} to {dst}:{port}: {r.get('replied', 0)}/{count} "
                                        f"replies from the probe listener ({err})")
                out["problems"] = problems
                out["intercepted"] = not problems
            finally:
                if listener is not None:
                    listener.kill()
                    listener.wait(timeout=10)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError, _Stop) as exc:
        out["problems"].append(f"local probe: {exc}")
    out.setdefault("swept", pns.swept)
    out["removed"] = name not in ip_cmd("netns", "list", check=False).split()
    return out


# ----------------------------------------------------------------------------- trace
# One real probe connection, traced by the kernel. Only the probe's SYN is marked for tracing (its
# addresses and ports), by a temporary object named after this process:
#   native nftables: table inet sidecar_trace_<pid> (prerouting/output chains at priority -350, before
#                    raw), read with `nft monitor trace`;
#   iptables-nft:    chain SCTRACE_<pid> with a -j TRACE rule, jumped to from the first rule of the
#                    PREROUTING/OUTPUT chain of the earliest table the host already has (raw, else
#                    mangle, else nat: creating a table would leave it behind), read with
#                    `xtables-monitor --trace`;
#   iptables-legacy: TRACE goes to the kernel log (nf_log; none from a non-initial namespace unless
#                    nf_log_all_netns=1); not read here (the result says so).
# IPv6 on iptables-nft: `nft -a monitor trace` runs beside xtables-monitor (1.8.9 exits on IPv6 TCP
# rules) and its reading is used when xtables-monitor printed no path; the result's `tool` says which.
TRACE_TABLE = "sidecar_trace_"
TRACE_CHAIN = "SCTRACE_"
TRACE_RE = re.compile(r"^(?:sidecar_trace_|SCTRACE_)(\d+)$")
OWNED_NFT_TABLE = "sidecar_intercept"
OWNED_CHAIN_PREFIX = "SIDECAR_"
XT_VERDICTS = {"0xffffffff": "continue", "0xfffffffe": "break", "0xfffffffd": "jump", "0xfffffffc": "goto",
               "0xfffffffb": "return"}
_NFT_LINE = re.compile(r"^trace id (\S+) (\S+) (\S+) (\S+) (.*)$")
_NFT_RULE = re.compile(r"^rule (.*?)(?: # handle (\d+))? \(verdict (.*)\)$")
_XT_TRACE = re.compile(r"^\s*TRACE: (\d+) (\S+) (\S+?)(?:\s+(.*))?$")
_XT_PACKET = re.compile(r"^\s*PACKET: (\d+) (\S+) (.*)$")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def _step(family: str, table: str, chain: str, handle: str, rule: str, verdict: str, pkt: str) -> dict:
    word, _sep, target = verdict.strip().partition(" ")
    verdict = (word.lower() + " " + target).strip()  # the verdict's word in lower case, a chain name as it is
    ours = (table == OWNED_NFT_TABLE or chain.startswith(OWNED_CHAIN_PREFIX)
            or verdict.startswith(("jump " + OWNED_CHAIN_PREFIX, "goto " + OWNED_CHAIN_PREFIX)))
    low = rule.lower()
    action = ""
    if verdict == "return":
        action = "RETURN"
    elif verdict.startswith(("accept", "stolen", "drop")):
        for word in ("tproxy", "redirect", "dnat", "masquerade", "drop", "reject"):
            if re.search(r"(^|[\s-])%s\b" % word, low):
                action = word.upper()
                break
    return {"family": family, "table": table, "chain": chain, "handle": handle, "rule": rule,
            "verdict": verdict, "ours": ours, "action": action, "packet": pkt}


def parse_nft_trace(text: str, marker_table: str, marker_chain: str = "") -> dict:
    """`nft [-a] monitor trace` output -> the steps of the packets our marker table marked, in order.

    Steps inside the marker table itself are left out; rule counters are shortened to `counter`.
    With marker_chain (an iptables-nft trace read by nft), the packets that passed that chain are the
    marked ones, and the chain's own steps and the jumps to it are left out."""
    events = []
    marked = []
    packets: dict = {}
    for line in text.splitlines():
        m = _NFT_LINE.match(line.strip())
        if not m:
            continue
        tid, family, table, chain, rest = m.groups()
        if table == marker_table or (marker_chain and chain == marker_chain):
            if tid not in marked:
                marked.append(tid)
            continue
        if rest.startswith("packet:"):
            packets.setdefault(tid, rest[len("packet:"):].strip())
            continue
        r = _NFT_RULE.match(rest)
        if r:
            rule, handle, verdict = r.group(1), r.group(2) or "", r.group(3)
        elif rest.startswith(("policy ", "verdict ")):
            rule, handle, verdict = rest.split(" ", 1)[0], "", rest.split(" ", 1)[1]
        else:
            continue
        if marker_chain and verdict.split(" ")[-1] == marker_chain:
            continue
        family = {"ip": "ipv4", "ip6": "ipv6"}.get(family, family)  # named as the xtables reader names them
        events.append((tid, _step(family, table, chain, handle, _COUNTER.sub("counter", rule).strip(), verdict, tid)))
    steps = [st for tid, st in events if tid in marked]
    return {"packets": [{"id": t, "packet": packets.get(t, "")} for t in marked], "steps": steps}


def parse_xtables_trace(text: str, marker_chain: str) -> dict:
    """`xtables-monitor --trace` output -> the steps of the packets our marker chain marked, in order.

    Verdict codes the tool prints as numbers (0xfffffffb) become words (return); the marker chain's
    own steps and the jumps to it are left out; rule text loses its `-4 -t TABLE ` prefix."""
    events = []
    marked = []
    packets: dict = {}
    for line in text.splitlines():
        p = _XT_PACKET.match(line)
        if p:
            packets.setdefault(p.group(2), p.group(3).strip())
            continue
        m = _XT_TRACE.match(line)
        if not m:
            continue
        fam, tid, head, rule = m.group(1), m.group(2), m.group(3), (m.group(4) or "").strip()
        parts = head.split(":")
        if len(parts) < 4:
            continue
        table, chain, kind, rest = parts[0], parts[1], parts[2], parts[3:]
        if chain == marker_chain:
            if tid not in marked:
                marked.append(tid)
            continue
        if kind == "rule":
            handle, verdict = rest[0], ":".join(rest[1:])
            handle = str(int(handle, 16)) if re.match(r"^0x[0-9a-fA-F]+$", handle) else handle  # as nft -a shows it
            word = XT_VERDICTS.get(verdict.lower(), verdict)
            verdict = word.replace(":", " ", 1) if word.upper().startswith(("JUMP:", "GOTO:")) else word
        else:
            handle, verdict = "", ":".join(rest)
        if verdict.lower().split(" ")[-1] == marker_chain.lower():
            continue
        rule = re.sub(r"^-[46] -t \S+ ", "", rule) if kind == "rule" else kind
        family = {"2": "ipv4", "10": "ipv6"}.get(fam, fam)
        events.append((tid, _step(family, table, chain, handle, rule, verdict, tid)))
    steps = [st for tid, st in events if tid in marked]
    return {"packets": [{"id": t, "packet": packets.get(t, "")} for t in marked], "steps": steps}


def parse_destination(text: str) -> tuple:
    """IP:PORT or [IPv6]:PORT -> (family, address, port); ValueError naming the value."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([0-9.]+):(\d+)$", text)
    if not m:
        raise ValueError(f"destination must be IP:PORT or [IPv6]:PORT, got {text!r}")
    try:
        addr = ipaddress.ip_address(m.group(1))
    except ValueError:
        raise ValueError(f"destination {text!r}: {m.group(1)!r} is not an IP address") from None
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"destination port out of range in {text!r}")
    return ("ipv6" if addr.version == 6 else "ipv4"), str(addr), port


def _run(cmd: list, stdin: str = "", timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                          timeout=timeout, check=False)


def _which(name: str) -> str:
    return shutil.which(name, path=ENV["PATH"]) or ""


def _iptables_kind(backend: str, family: str) -> tuple:
    """(iptables command, '' or why there is no trace) for an iptables backend."""
    base = "ip6tables" if family == "ipv6" else "iptables"
    if backend == "plain":
        ver = _run([base, "-V"]).stdout.decode("utf-8", "replace") if _which(base) else ""
        backend = "nft" if "nf_tables" in ver else "legacy"
        cmd = base
    else:
        cmd = f"{base}-{backend}"
    if backend == "legacy":
        # legacy TRACE has no netlink event: the nf_log backend (/proc/sys/net/netfilter/nf_log/<family>)
        # writes "TRACE: table:chain:type:rulenum" lines to the kernel log, and only for the initial
        # network namespace unless net.netfilter.nf_log_all_netns=1 (a machine-wide switch not flipped
        # here); those lines carry no trace id, so they cannot be told from other traced packets reliably
        return cmd, ("iptables-legacy sends TRACE to the kernel log (nf_log, only in the initial network namespace "
                     "unless net.netfilter.nf_log_all_netns=1), which is not read here; no traced path (the "
                     "verdict above is computed from the rules)")
    if not _which(cmd) or not _which("xtables-monitor"):
        return cmd, f"{cmd} or xtables-monitor is not installed"
    return cmd, ""


def _nft_trace_table(name: str, family: str, chain: str, match: str) -> str:
    hook = "prerouting" if chain == "prerouting" else "output"
    return (f"table inet {name} {{\n\tchain {hook} {{\n\t\ttype filter hook {hook} priority -350; policy accept;\n"
            f"\t\t{match} tcp flags & (syn | ack) == syn meta nftrace set 1\n\t}}\n}}\n")


def sweep_trace() -> list:
    """Remove the trace tables/chains of runs that are gone (killed before their own cleanup)."""
    removed = []
    if _which("nft"):
        for line in _run(["nft", "list", "tables"]).stdout.decode("utf-8", "replace").splitlines():
            parts = line.split()
            m = TRACE_RE.match(parts[-1]) if len(parts) == 3 else None
            if m and parts[1] == "inet" and not _alive(int(m.group(1))):
                _run(["nft", "delete", "table", "inet", parts[-1]])
                removed.append(parts[-1])
    for base in ("iptables", "ip6tables"):
        for cmd in (f"{base}-nft", base):
            if not _which(cmd) or not _which(f"{cmd}-save"):
                continue
            table = ""
            for line in _run([f"{cmd}-save"]).stdout.decode("utf-8", "replace").splitlines():
                if line.startswith("*"):
                    table = line[1:]
                m = re.match(r"^:(SCTRACE_(\d+)) ", line)
                if m and not _alive(int(m.group(2))):
                    for hook in ("PREROUTING", "OUTPUT"):
                        while _run([cmd, "-t", table, "-D", hook, "-j", m.group(1)]).returncode == 0:
                            pass
                    _run([cmd, "-t", table, "-F", m.group(1)])
                    _run([cmd, "-t", table, "-X", m.group(1)])
                    removed.append(f"{table}/{m.group(1)}")
            break
    return removed


class _Tracer:
    """The temporary marker (nft table or iptables chain) and the monitor reading the trace."""

    def __init__(self, backend: str, family: str, direction: str, timeout: float) -> None:
        self.backend, self.family, self.direction, self.timeout = backend, family, direction, timeout
        pid = os.getpid()
        self.table, self.chain = f"{TRACE_TABLE}{pid}", f"{TRACE_CHAIN}{pid}"
        self.hook = "PREROUTING" if direction == "inbound" else "OUTPUT"
        self.cmd, self.reason = ("", "") if backend == "nftables" else _iptables_kind(backend, family)
        if backend == "nftables" and not _which("nft"):
            self.reason = "nft is not installed"
        self.tool = "nft monitor trace" if backend == "nftables" else "xtables-monitor --trace"
        self.xt_table = ""
        self.error = ""
        self.monitor: subprocess.Popen | None = None
        self.nft_reader: subprocess.Popen | None = None  # IPv6 on iptables-nft: nft reads the trace too
        self.fallback_text = ""
        self.created: list = []

    def start(self, src: str, dst: str, dport: int, sport: int = 0) -> None:
        v = "ip6" if self.family == "ipv6" else "ip"
        if self.backend == "nftables":
            match = f"{v} daddr {dst} tcp dport {dport}" + (f" {v} saddr {src}" if src else "")
            match += f" tcp sport {sport}" if sport else ""
            res = _run(["nft", "-f", "-"], _nft_trace_table(self.table, self.family, self.hook.lower(), match))
            if res.returncode != 0:
                raise RuntimeError("nft: " + res.stderr.decode("utf-8", "replace").strip())
            self.created.append("table")
            mon = ["nft", "-a", "monitor", "trace"]
        else:
            tables = [ln[1:] for ln in _run([f"{self.cmd}-save"]).stdout.decode("utf-8", "replace").splitlines()
                      if ln.startswith("*")]
            self.xt_table = next((t for t in ("raw", "mangle", "nat") if t in tables), "")
            if not self.xt_table:
                raise RuntimeError(f"{self.cmd}: no raw, mangle or nat table to trace from (no capture rules?)")
            rule = ["-p", "tcp", "-d", dst, "--dport", str(dport), "--tcp-flags", "SYN,ACK", "SYN", "-j", "TRACE"]
            rule += ["-s", src] if src else []
            rule += ["--sport", str(sport)] if sport else []
            for step in (["-N", self.chain], ["-A", self.chain, *rule], ["-I", self.hook, "1", "-j", self.chain]):
                res = _run([self.cmd, "-w", "5", "-t", self.xt_table, *step])
                if res.returncode != 0:
                    raise RuntimeError("{} {}: {}".format(self.cmd, " ".join(step), res.stderr.decode().strip()))
                self.created.append(step[0])
            mon = ["xtables-monitor", "--trace", "-6" if self.family == "ipv6" else "-4"]
        self.monitor = self._spawn(mon)
        if self.backend != "nftables" and self.family == "ipv6" and _which("nft"):
            # xtables-monitor 1.8.9 exits on IPv6 TCP rules ("Parsing nftables rule failed"); the same
            # trace events, read by nft, are the fallback (the iptables-nft rules are nftables rules)
            self.nft_reader = self._spawn(["nft", "-a", "monitor", "trace"])
        time.sleep(0.5)  # the monitor subscribes to the trace events
        if self.monitor.poll() is not None:
            raise RuntimeError("{} exited: {}".format(" ".join(mon), self.monitor.stderr.read().decode().strip()
                                                      if self.monitor.stderr else ""))

    def _spawn(self, cmd: list) -> subprocess.Popen:
        # bounded even when this process is killed outright (coreutils timeout ends the monitor)
        return subprocess.Popen(["timeout", str(int(self.timeout) + 15), *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ENV, start_new_session=True)

    def _collect(self, proc: subprocess.Popen) -> tuple:
        """Stop a monitor; (stdout, stderr, whether it had exited on its own before)."""
        died = proc.poll() is not None  # on its own, before we stop it: it failed
        self._signal_monitor(signal.SIGTERM, proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._signal_monitor(signal.SIGKILL, proc)
            out, err = proc.communicate(timeout=5)
        return out, err, died

    def finish(self) -> str:
        """Stop the monitor(s) and return what the main one printed (the fallback's in fallback_text)."""
        if self.monitor is None:
            return ""
        time.sleep(0.5)  # the last events of the probe
        out, err, died = self._collect(self.monitor)
        if self.nft_reader is not None:
            self.fallback_text = self._collect(self.nft_reader)[0].decode("utf-8", "replace")
            self.nft_reader = None
        if died:
            # e.g. xtables-monitor 1.8.9 cannot print IPv6 TCP rules: "Parsing nftables rule failed"
            self.error = " ".join(err.decode("utf-8", "replace").split())[:300] or "exited"
        self.monitor = None
        return out.decode("utf-8", "replace")

    def _signal_monitor(self, sig: int, proc: subprocess.Popen | None = None) -> None:
        """A monitor and the `timeout` around it are a process group of their own: signal both."""
        proc = proc or self.monitor
        if proc is not None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def remove(self) -> dict:
        """Remove everything temporary; what is left afterwards (empty when all is gone)."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for proc in (self.monitor, self.nft_reader):
                if proc is None:
                    continue
                self._signal_monitor(signal.SIGTERM, proc)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
                self._signal_monitor(signal.SIGKILL, proc)
                proc.wait(timeout=5)
            self.monitor = self.nft_reader = None
            left = []
            if self.backend == "nftables" and _which("nft"):
                _run(["nft", "delete", "table", "inet", self.table])
                if _run(["nft", "list", "table", "inet", self.table]).returncode == 0:
                    left.append(f"table inet {self.table}")
            elif self.xt_table and self.created:
                t = [self.cmd, "-w", "5", "-t", self.xt_table]
                while _run([*t, "-D", self.hook, "-j", self.chain]).returncode == 0:
                    pass
                _run([*t, "-F", self.chain])
                _run([*t, "-X", self.chain])
                if self.chain in _run([f"{self.cmd}-save", "-t", self.xt_table]).stdout.decode("utf-8", "replace"):
                    left.append(f"{self.xt_table} chain {self.chain}")
            return {"left": left}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _local_addresses(family: str) -> list:
    links = json.loads(ip_cmd("-6" if family == "ipv6" else "-4", "-j", "addr", "show", check=False) or "[]")
    return [a.get("local") for link in links for a in link.get("addr_info", []) if a.get("local")]


def _outbound_probe(family: str, dst: str, port: int, uid: int | None, gid: int | None, timeout: float,
                    tracer: _Tracer) -> dict:
    """Open one connection from this host to dst:port as uid/gid (the socket's owner), traced."""
    af = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
    with effective_ids(uid, gid):
        sock = socket.socket(af, socket.SOCK_STREAM)
    item = {"ok": False, "error": ""}
    with sock:
        sock.bind(("::" if af == socket.AF_INET6 else "0.0.0.0", 0))
        sport = sock.getsockname()[1]
        item["local_port"] = sport
        tracer.start("", dst, port, sport)
        sock.settimeout(timeout)
        t0 = time.monotonic()
        try:
            sock.connect((dst, port))
            item["ok"] = True
        except OSError as exc:
            item["error"] = f"{type(exc).__name__}: {exc}"
        item["ms"] = round((time.monotonic() - t0) * 1000.0, 1)
    return item


def trace_result(destination: str, direction: str, backend: str, uid: int | None, gid: int | None,
                 timeout: float, prefix: str = NETNS_PREFIX, avoid: list | None = None) -> dict:
    """One real probe connection to `destination`, and the path the kernel traced for it."""
    out: dict = {"available": False, "reason": "", "destination": destination, "direction": direction,
                 "backend": backend, "tool": "", "steps": [], "packets": [], "probe": {}, "problems": [],
                 "left": []}
    try:
        family, addr, port = parse_destination(destination)
    except ValueError as exc:
        out["reason"] = str(exc)
        return out
    if backend not in ("nftables", "nft", "legacy", "plain"):
        out["reason"] = "no capture rules on this host (backend {}): nothing to trace".format(backend or "none")
        return out
    if direction == "inbound":
        if addr not in _local_addresses(family) or ipaddress.ip_address(addr).is_loopback:
            out["reason"] = (f"{addr} is not a (non-loopback) address of this host: an inbound probe from a "
                             "namespace would be forwarded, not traced here")
            return out
    tracer = _Tracer(backend, family, direction, timeout)
    out["tool"] = tracer.tool
    if tracer.reason:
        out["reason"] = tracer.reason
        return out
    out["swept"] = sweep_trace()
    text = ""
    try:
        with _Signals():
            try:
                if direction == "outbound":
                    out["probe"] = _outbound_probe(family, addr, port, uid, gid, timeout, tracer)
                else:
                    with ProbeNamespace(prefix, avoid, ipv6=family == "ipv6") as pns:
                        out["netns"] = pns.name
                        src = pns.ns_ip6 if family == "ipv6" else pns.ns_ip
                        ip_cmd("-n", pns.name, "-6" if family == "ipv6" else "-4", "route", "add", "default",
                               "via", pns.host_ip6 if family == "ipv6" else pns.host_ip)
                        tracer.start(src, addr, port)
                        me = [sys.executable, os.path.abspath(__file__)]
                        res = subprocess.run([*pns.exec_args(), *me, "connect", "--host", addr, "--port", str(port),
                                              "--timeout", str(timeout), "--no-data"],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                             timeout=timeout + 10, check=False)
                        try:
                            r = (json.loads(res.stdout.decode() or "{}").get("results") or [{}])[0]
                        except ValueError:
                            r = {"ok": False, "error": res.stderr.decode("utf-8", "replace")[-300:]}
                        out["probe"] = {"ok": r.get("ok", False), "error": r.get("error", ""), "ms": r.get("ms"),
                                        "source": src}
                        text = tracer.finish()
                    out["netns_removed"] = pns.removed
                text = text or tracer.finish()
            finally:
                out["left"] = tracer.remove()["left"]
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError, _Stop) as exc:
        out["problems"].append(f"trace: {exc}")
        text = ""
    stopped = f"{tracer.tool} stopped before the end of the trace: {tracer.error}" if tracer.error else ""
    parsed = parse_nft_trace(text, tracer.table) if backend == "nftables" else parse_xtables_trace(text, tracer.chain)
    if (tracer.error or not parsed["steps"]) and tracer.fallback_text:  # xtables-monitor died or saw nothing
        fallback = parse_nft_trace(tracer.fallback_text, "", tracer.chain)
        if fallback["steps"]:
            parsed, stopped = fallback, ""
            out["tool"] = "nft monitor trace (fallback: xtables-monitor printed no path; rules shown as nft rules)"
            out["notes"] = [f"{tracer.tool} printed no path ({tracer.error or 'no events'}): read with nft instead"]
    if stopped:
        out["problems"].append(stopped)
    out.update(parsed)
    out["available"] = bool(out["steps"])
    if not out["steps"] and not out["reason"]:
        out["reason"] = "; ".join(out["problems"]) or "the kernel traced no packet of the probe"
    for what in out["left"]:
        out["problems"].append(f"left behind: {what}")
    return out


def trace(destination: str, direction: str, backend: str, uid: int | None, gid: int | None, timeout: float,
          prefix: str, avoid: list) -> int:
    emit(trace_result(destination, direction, backend, uid, gid, timeout, prefix, avoid))
    return 0


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar-probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--notify", action="store_true", help="print 'ready' once listening")
    p = sub.add_parser("snapshot")
    p.add_argument("--admin-port", type=int, required=True)
    p = sub.add_parser("connect")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--as-gid", type=int, default=None, help="create the sockets with this effective GID (root)")
    p.add_argument("--no-data", action="store_true", help="connect and close, send nothing")
    p = sub.add_parser("evidence")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--since", type=float, required=True)
    p.add_argument("--before", default="{}", help="connections_total from snapshot, as JSON")
    p.add_argument("--expect", action="append", default=[], help="DIRECTION=IP:PORT")
    p.add_argument("--wait", type=float, default=10.0)
    p.add_argument("--unit", default="sidecar-proxy.service")
    p.add_argument("--no-log", action="store_true", help="check counters only (access log disabled)")
    p.add_argument("--log-file", default="", help="read the access log from this file, not the journal")
    p = sub.add_parser("local")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--avoid", action="append", default=[], help="IPv4 network the probe pair must not use")
    p.add_argument("--unit", default="sidecar-proxy.service")
    p.add_argument("--no-log", action="store_true", help="check counters only (access log disabled)")
    p.add_argument("--log-file", default="", help="read the access log from this file, not the journal")
    p.add_argument("--prefix", default=NETNS_PREFIX, help="name prefix of the temporary namespace")
    p = sub.add_parser("trace")
    p.add_argument("--destination", required=True, help="IP:PORT or [IPv6]:PORT")
    p.add_argument("--direction", choices=["inbound", "outbound"], required=True)
    p.add_argument("--backend", required=True, help="nftables, nft, legacy or plain (explain's backend)")
    p.add_argument("--uid", type=int, default=None, help="outbound: the probe socket's owner UID")
    p.add_argument("--gid", type=int, default=None, help="outbound: the probe socket's owner GID")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--avoid", action="append", default=[], help="IPv4 network the probe pair must not use")
    p.add_argument("--prefix", default=NETNS_PREFIX, help="name prefix of the temporary namespace")
    p = sub.add_parser("cleanup")
    p.add_argument("--prefix", default=NETNS_PREFIX, help="name prefix of the temporary namespaces")
    args = parser.parse_args(argv)
    for port in [getattr(args, "port", 1), getattr(args, "admin_port", 1)]:
        if not 1 <= port <= 65535:
            parser.error(f"port out of range: {port}")
    if args.cmd == "serve":
        return serve(args.port, args.notify)
    if args.cmd == "cleanup":
        emit({"removed": sweep(args.prefix) + sweep_trace()})
        return 0
    if args.cmd in ("local", "trace"):
        for net in args.avoid:
            try:
                ipaddress.IPv4Network(net, strict=False)
            except ValueError:
                parser.error(f"--avoid must be an IPv4 network, got {net!r}")
        if not re.match(r"^[A-Za-z0-9_.-]{1,16}$", args.prefix):
            parser.error(f"--prefix must be 1-16 letters, digits, '.', '_' or '-', got {args.prefix!r}")
    if args.cmd == "trace":
        try:
            parse_destination(args.destination)
        except ValueError as exc:
            parser.error(str(exc))
        for key in ("uid", "gid"):
            if getattr(args, key) is not None and not 0 <= getattr(args, key) <= 0xFFFFFFFE:
                parser.error(f"--{key} out of range: {getattr(args, key)}")
        if not 0.5 <= args.timeout <= 60:
            parser.error(f"--timeout must be 0.5..60 seconds, got {args.timeout}")
        return trace(args.destination, args.direction, args.backend, args.uid, args.gid, args.timeout,
                     args.prefix, args.avoid)
    if args.cmd in ("connect", "local") and not 1 <= args.count <= 20:
        parser.error(f"--count must be 1..20, got {args.count}")
    if args.cmd == "local":
        return local(args.admin_port, args.port, args.count, args.timeout, args.avoid, args.unit,
                     not args.no_log, args.log_file, args.prefix)
    if args.cmd == "snapshot":
        return snapshot(args.admin_port)
    if args.cmd == "connect":
        return connect(args.host, args.port, args.count, args.timeout, args.as_gid, args.no_data)
    for spec in args.expect:
        if spec.partition("=")[0] not in ("inbound", "outbound") or not spec.partition("=")[2]:
            parser.error(f"--expect must be inbound=IP:PORT or outbound=IP:PORT, got {spec!r}")
    try:
        before = json.loads(args.before)
    except ValueError:
        parser.error(f"--before is not JSON: {args.before!r}")
    return evidence(args.admin_port, args.since, before, args.expect, args.wait, args.unit, not args.no_log,
                    args.log_file)


if __name__ == "__main__":
    sys.exit(main())
