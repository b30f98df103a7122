"""Run on the managed host by the proxy role: poll the proxy's admin /ready until it answers 200 or the
timeout passes, in one round trip (an Ansible retry loop would add a connection per attempt).
Usage: wait_ready.py URL TIMEOUT_SECONDS [--activated N]. Exit 0 when ready, 1 otherwise; prints what it saw.

--activated N: ready also means that the proxy serves N listeners and every one of them is a socket
passed by systemd (socket activation, /stats "listeners"[].activated), not one it bound itself: a proxy
that bound its own listeners would close them on the next restart. Until the new process answers, the
admin port may refuse (nothing holds it between two processes) or answer from a process that is still
starting: both are retried until the timeout."""
import json
import sys
import time
import urllib.error
import urllib.request

url, timeout = sys.argv[1], float(sys.argv[2])
activated = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--activated" else None
stats_url = url.rsplit("/", 1)[0] + "/stats"
deadline = time.monotonic() + timeout
last = "no answer"


def listeners_ok() -> str:
    """'' when the proxy serves exactly the activated listeners, else what differs."""
    with urllib.request.urlopen(stats_url, timeout=2) as resp:
        listeners = json.load(resp).get("listeners", [])
    own = [f"{x['direction']}/{x['family']}:{x['port']}" for x in listeners if not x.get("activated")]
    if own:
        return "listeners not passed by systemd (bound by the proxy itself): " + ", ".join(own)
    if len(listeners) != activated:
        return f"{len(listeners)} activated listeners, expected {activated}"
    return ""


while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                why = listeners_ok() if activated is not None else ""
                if not why:
                    print(f"ready after {timeout - (deadline - time.monotonic()):.1f}s")
                    sys.exit(0)
                last = why
            else:
                last = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        last = f"HTTP {exc.code} " + exc.read(200).decode("utf-8", "replace").strip()
    except (OSError, ValueError) as exc:
        last = str(getattr(exc, "reason", exc))
    if time.monotonic() >= deadline:
        print(f"not ready after {timeout:g}s: {last}")
        sys.exit(1)
    time.sleep(0.2)
