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
import ipaddress
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request

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
def open_socket(host: str, port: int, timeout: float, as_gid: int | None) -> socket.socket:
    """Connect; with as_gid (root only) the socket is created with that effective GID, so that an
    owner match for the proxy's GID lets it pass this host's own outbound capture: an inbound probe
    then tests the target's inbound path only, not the sender's outbound path too."""
    if as_gid is None or os.geteuid() != 0:
        return socket.create_connection((host, port), timeout=timeout)
    saved = os.getegid()
    os.setegid(as_gid)
    try:
        return socket.create_connection((host, port), timeout=timeout)
    finally:
        os.setegid(saved)


def connect(host: str, port: int, count: int, timeout: float, as_gid: int | None = None) -> int:
    emit(connect_result(host, port, count, timeout, as_gid))
    return 0


def connect_result(host: str, port: int, count: int, timeout: float, as_gid: int | None = None) -> dict:
    results = []
    for i in range(count):
        t0 = time.monotonic()
        item = {"n": i, "ok": False, "reply": "", "error": ""}
        try:
            with open_socket(host, port, timeout, as_gid) as sock:
                item["local"] = "{}:{}".format(*sock.getsockname()[:2])
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


def used_networks() -> list:
    """The host's IPv4 networks a probe pair must not overlap: its addresses and specific routes."""
    used = list(RESERVED)
    for link in json.loads(ip_cmd("-4", "-j", "addr", "show", check=False) or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.ip_network("{}/{}".format(a["local"], a.get("prefixlen", 32)), strict=False))
    for route in json.loads(ip_cmd("-4", "-j", "route", "show", "table", "all", check=False) or "[]"):
        dst = route.get("dst", "")
        if dst in ("", "default"):
            continue
        net = ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False)
        if net.prefixlen >= 24:  # a zeroconf 169.254.0.0/16 route does not make its addresses used
            used.append(net)
    return used


def pick_network(avoid: list, seed: int) -> ipaddress.IPv4Network:
    """A link-local /30 that overlaps none of `avoid`, starting at a place given by `seed`."""
    subnets = 1 << (30 - CANDIDATES.prefixlen)
    for i in range(subnets):
        n = (seed * 4099 + i) % subnets
        net = ipaddress.ip_network((int(CANDIDATES.network_address) + 4 * n, 30))
        if n == 0 or n == subnets - 1 or any(net.overlaps(a) for a in avoid):
            continue
        return net
    raise RuntimeError("no free link-local /30 for the probe namespace")


class _Stop(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise _Stop(f"signal {signum}")


def local(admin_port: int, port: int, count: int, timeout: float, avoid: list, unit: str, use_log: bool,
          log_file: str = "", prefix: str = NETNS_PREFIX) -> int:
    emit(local_result(admin_port, port, count, timeout, avoid, unit, use_log, log_file, prefix))
    return 0


def local_result(admin_port: int, port: int, count: int, timeout: float, avoid: list, unit: str, use_log: bool,
                 log_file: str = "", prefix: str = NETNS_PREFIX) -> dict:
    """Probe both directions of this host's capture without a second host (see the module doc)."""
    pid = os.getpid()
    name, veth_host, veth_ns = f"{prefix}{pid}", f"spr{pid}h", f"spr{pid}n"
    out: dict = {"netns": name, "intercepted": False, "problems": [], "swept": sweep(prefix)}
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    listener = None
    try:
        net = pick_network(used_networks() + [ipaddress.ip_network(a, strict=False) for a in avoid], pid)
        host_ip, ns_ip = (str(h) for h in list(net.hosts())[:2])
        out.update(host_address=host_ip, netns_address=ns_ip, network=str(net))
        try:
            ip_cmd("netns", "add", name)
        except RuntimeError as exc:
            hint = ("; a container needs CAP_SYS_ADMIN for network namespaces, or name a probe peer "
                    "(sidecar_rollout_probe_peer)") if "not permitted" in str(exc) else ""
            raise RuntimeError(f"{exc}{hint}") from None
        ip_cmd("link", "add", veth_host, "type", "veth", "peer", "name", veth_ns)
        ip_cmd("link", "set", veth_ns, "netns", name)
        ip_cmd("addr", "add", f"{host_ip}/30", "dev", veth_host)
        ip_cmd("link", "set", veth_host, "up")
        ip_cmd("-n", name, "link", "set", "lo", "up")
        ip_cmd("-n", name, "addr", "add", f"{ns_ip}/30", "dev", veth_ns)
        ip_cmd("-n", name, "link", "set", veth_ns, "up")
        me = [sys.executable, os.path.abspath(__file__)]
        listener = subprocess.Popen(["ip", "netns", "exec", name, *me, "serve", "--port", str(port), "--notify"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
        if listener.stdout is None or listener.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the probe listener in {name} did not start on port {port}")
        before = counters(admin_port)
        since = time.time() - 1.0
        # inbound: a client in the namespace, like a remote host, to the host's side of the pair
        res = subprocess.run(["ip", "netns", "exec", name, *me, "connect", "--host", host_ip, "--port", str(port),
                              "--count", str(count), "--timeout", str(timeout)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                             timeout=count * (timeout + 1) + 10, check=False)
        try:
            out["inbound"] = json.loads(res.stdout.decode() or "{}")
        except ValueError:
            out["inbound"] = {"replied": 0, "results": [{"error": res.stderr.decode("utf-8", "replace")[-300:]}]}
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
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError, _Stop) as exc:
        out["problems"].append(f"local probe: {exc}")
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        _remove_netns(name)
        ip_cmd("link", "del", veth_host, check=False)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    out["removed"] = name not in ip_cmd("netns", "list", check=False).split()
    return out


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
    p = sub.add_parser("cleanup")
    p.add_argument("--prefix", default=NETNS_PREFIX, help="name prefix of the temporary namespaces")
    args = parser.parse_args(argv)
    for port in [getattr(args, "port", 1), getattr(args, "admin_port", 1)]:
        if not 1 <= port <= 65535:
            parser.error(f"port out of range: {port}")
    if args.cmd == "serve":
        return serve(args.port, args.notify)
    if args.cmd == "cleanup":
        emit({"removed": sweep(args.prefix)})
        return 0
    if args.cmd in ("connect", "local") and not 1 <= args.count <= 20:
        parser.error(f"--count must be 1..20, got {args.count}")
    if args.cmd == "local":
        for net in args.avoid:
            try:
                ipaddress.IPv4Network(net, strict=False)
            except ValueError:
                parser.error(f"--avoid must be an IPv4 network, got {net!r}")
        if not re.match(r"^[A-Za-z0-9_.-]{1,16}$", args.prefix):
            parser.error(f"--prefix must be 1-16 letters, digits, '.', '_' or '-', got {args.prefix!r}")
        return local(args.admin_port, args.port, args.count, args.timeout, args.avoid, args.unit,
                     not args.no_log, args.log_file, args.prefix)
    if args.cmd == "snapshot":
        return snapshot(args.admin_port)
    if args.cmd == "connect":
        return connect(args.host, args.port, args.count, args.timeout, args.as_gid)
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
