"""The two settings added through the settings -> rules model -> backend seam, on real netfilter with
both backends (iptables-restore text via iptables_chains, native nftables via nft_table), in
throwaway network namespaces: sidecar_inbound_exclude_cidrs (these sources stay direct) and
sidecar_outbound_include_ports (outbound captured only to these ports)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


netns = _load("capture_netns", HERE / "test_netns.py")
regen = _load("golden_regen", ROOT / "tests" / "golden" / "regen.py")
sh, start_server, two_hosts = netns.sh, netns.start_server, netns.two_hosts
ns = netns.ns  # the fixture

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft") or not shutil.which("iptables-nft"),
    reason="needs root, iproute2, nft and iptables")

MODULES = {"iptables": "ansible_collections.sidecar.intercept.plugins.modules.iptables_chains",
           "nftables": "ansible_collections.sidecar.intercept.plugins.modules.nft_table"}

CLIENT = """
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
s.bind((src, 0)); s.connect((dst, port)); print(s.recv(200).decode())
"""


def apply(name, tmp_path, backend, settings, family):
    if backend == "nftables":
        args = {"rules": regen.render(settings, None, "rules.nft.j2")}
    else:
        args = {"family": family, "backend": "nft", "rules": regen.render(settings, family)}
    path = tmp_path / ("args-%s.json" % uuid.uuid4().hex[:6])
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    out = json.loads(sh("ip", "netns", "exec", name, sys.executable, "-m", MODULES[backend], str(path),
                        check=False).stdout)
    assert out.get("changed") and not out.get("failed"), out


def connect(name, src, dst, port):
    out = sh("ip", "netns", "exec", name, sys.executable, "-c", CLIENT, src, dst, str(port), check=False)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_inbound_exclude_cidrs_and_outbound_include_ports(ns, tmp_path, backend, family):
    server, client, addr_s, addr_c = two_hosts(ns, family)
    v6 = family == "ipv6"
    other = "fd00:232::3" if v6 else "10.232.0.3"  # a second client address, not excluded
    dev = sh("ip", "netns", "exec", client, "ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip()
    sh("ip", "netns", "exec", client, "ip", "addr", "add", "%s/%s" % (other, 64 if v6 else 24),
       "dev", dev.split("@")[0], "nodad")
    settings = {"sidecar_inbound_exclude_cidrs": [addr_c], "sidecar_outbound_include_ports": [7000]}
    procs = []
    try:
        apply(server, tmp_path, backend, settings, family)
        procs.append(start_server(server, "redirect", 15006, family))
        procs.append(start_server(server, "redirect", 15001, family))
        procs.append(start_server(server, "direct", 8080, family))
        for port in (7000, 7001):
            procs.append(start_server(client, "direct", port, family))
        time.sleep(0.2)
        # inbound: the excluded source reaches the app directly, another source goes to the proxy
        assert connect(client, addr_c, addr_s, 8080) == "direct 8080"
        assert connect(client, other, addr_s, 8080) == "proxy %s 8080" % addr_s
        # outbound: only the included port is captured
        assert connect(server, addr_s, addr_c, 7000) == "proxy %s 7000" % addr_c
        assert connect(server, addr_s, addr_c, 7001) == "direct 7001"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)
