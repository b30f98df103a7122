"""CPU cost of the reconciler (sidecar-capture-watch.service): one `repair` round while the capture is intact,
per backend and mode, measured in a throwaway network namespace (fw-bench-*) as CPU time of the round
itself plus the commands it runs (iptables-save, nft list, ip). The watch loop runs one round every
SIDECAR_CAPTURE_INTERVAL seconds (default 5), so its share of one core is cost / interval.

    sudo python benchmarks/reconciler/run.py [ROUNDS]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMAND = ROOT / "roles" / "capture" / "files" / "sidecar-capture.py"
LIB = ROOT / "plugins" / "module_utils"
GOLDEN = ROOT / "tests" / "golden" / "cases"
DRIVER = """
import importlib.util, os, resource, sys, time
spec = importlib.util.spec_from_file_location("capture", sys.argv[1])
cap = importlib.util.module_from_spec(spec); spec.loader.exec_module(cap)
rounds = int(sys.argv[2])
cap.repair()
t0 = time.process_time(); c0 = resource.getrusage(resource.RUSAGE_CHILDREN); w0 = time.monotonic()
for _ in range(rounds):
    assert cap.repair() == []
c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
own = time.process_time() - t0
kids = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
print("%.2f %.2f %.2f" % (own / rounds * 1000, kids / rounds * 1000, (time.monotonic() - w0) / rounds * 1000))
"""


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    print("| backend | mode | CPU ms per round (own + commands) | wall ms | share of one core at 5 s |")
    print("|---|---|---|---|---|")
    for backend, case, mode in (("legacy", "redirect-defaults", "redirect"), ("nft", "redirect-defaults", "redirect"),
                                ("nft", "tproxy-ports", "tproxy"), ("nftables", "redirect-defaults", "redirect"),
                                ("nftables", "tproxy-ports", "tproxy")):
        name = "fw-bench-" + uuid.uuid4().hex[:6]
        tmp = Path(tempfile.mkdtemp(prefix="fw-bench-"))
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
            conf = {"backend": backend, "families": ["ipv4", "ipv6"], "mode": mode, "mark": "0x539/0xfff",
                    "table": 133, "jump_position": "first", "dir": str(tmp)}
            (tmp / "capture.json").write_text(json.dumps(conf))
            if backend == "nftables":
                shutil.copy(GOLDEN / ("%s.nft" % case), tmp / "rules.nft")
            else:
                for fam in ("v4", "v6"):
                    shutil.copy(GOLDEN / ("%s.ip%s.rules" % (case, fam)), tmp / ("rules." + fam))
            env = dict(os.environ, SIDECAR_CAPTURE_CONFIG=str(tmp / "capture.json"), SIDECAR_CAPTURE_LIB=str(LIB),
                       SIDECAR_CAPTURE_STATE=str(tmp / "active"), SIDECAR_CAPTURE_LOCK=str(tmp / "lock"))
            run = ["ip", "netns", "exec", name, sys.executable]
            subprocess.run(run + [str(COMMAND), "start"], check=True, env=env)
            out = subprocess.run(run + ["-c", DRIVER, str(COMMAND), str(rounds)], check=True, env=env,
                                 capture_output=True, text=True).stdout.split()
            own, kids, wall = (float(x) for x in out)
            print("| %s | %s | %.1f (%.1f + %.1f) | %.1f | %.2f %% |" % (
                backend, mode, own + kids, own, kids, wall, (own + kids) / 5000 * 100))
        finally:
            subprocess.run(["ip", "netns", "del", name], check=False)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
