"""Run on the managed host by the proxy role: poll the proxy's admin /ready until it answers 200 or the
timeout passes, in one round trip (an Ansible retry loop would add a connection per attempt).
Usage: wait_ready.py URL TIMEOUT_SECONDS. Exit 0 when ready, 1 otherwise; prints what it saw."""
import sys
import time
import urllib.error
import urllib.request

url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
last = "no answer"
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                print(f"ready after {timeout - (deadline - time.monotonic()):.1f}s")
                sys.exit(0)
            last = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        last = f"HTTP {exc.code} " + exc.read(200).decode("utf-8", "replace").strip()
    except OSError as exc:
        last = str(getattr(exc, "reason", exc))
    if time.monotonic() >= deadline:
        print(f"not ready after {timeout:g}s: {last}")
        sys.exit(1)
    time.sleep(0.2)
