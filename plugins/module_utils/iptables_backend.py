# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running iptables tools: backend detection (like istio-iptables) and save/restore helpers."""

from __future__ import annotations

from ansible_collections.sidecar.intercept.plugins.module_utils.command import run
from ansible_collections.sidecar.intercept.plugins.module_utils.iptables import (
    count_rules,
    tool,
)


def detect_backend(module, requested="auto", required=True):
    """Pick how the rules reach the kernel.

    'legacy', 'nft' or 'nftables' when requested (the tools must exist); for 'auto', legacy when
    iptables-legacy already holds rules (IPv4 or IPv6), else nft (what istio-iptables does); the plain
    iptables tools when the -legacy/-nft variants do not exist ('plain'); and native nftables
    ('nftables') on a host with nft and no iptables at all. With required=False, returns None instead
    of failing when the tools are missing.
    """
    def missing(msg):
        if not required:
            return None
        return module.fail_json(msg=msg)

    if requested == "nftables":
        return "nftables" if module.get_bin_path("nft") else missing(
            "sidecar_capture_backend=nftables but nft is not installed (install the nftables package)")
    if requested in ("legacy", "nft"):
        name = tool("ipv4", requested, "restore")
        return requested if module.get_bin_path(name) else missing(
            "sidecar_capture_backend=%s but %s is not installed" % (requested, name))
    if not module.get_bin_path(tool("ipv4", "legacy", "save")) or not module.get_bin_path(tool("ipv4", "nft", "save")):
        if module.get_bin_path(tool("ipv4", None, "save")):
            return "plain"
        if module.get_bin_path("nft"):
            return "nftables"
        return missing("neither iptables nor nft found (install the iptables or the nftables package)")
    for fam in ("ipv4", "ipv6"):
        path = module.get_bin_path(tool(fam, "legacy", "save"))
        if not path:
            continue
        rc, out, _err = run(module, [path], check_rc=False)
        if rc == 0 and count_rules(out) > 0:
            return "legacy"
    return "nft"


def save(module, family, backend, counters=False, fail=True):
    """iptables-save output; with fail=False a failure raises RuntimeError instead of failing the module."""
    name = tool(family, backend, "save")
    path = module.get_bin_path(name)
    if not path:
        if fail:
            module.fail_json(msg="%s is not installed" % name)
        raise RuntimeError("%s is not installed" % name)
    args = [path]
    if counters:
        args.append("-c")
    rc, out, err = run(module, args, check_rc=fail)
    if rc != 0:
        raise RuntimeError("%s failed: %s" % (name, err.strip()))
    return out


def restore(module, family, backend, payload, test=False, what=None):
    """Apply (or with test=True only check) an iptables-restore --noflush payload."""
    path = module.get_bin_path(tool(family, backend, "restore"), required=True)
    args = [path, "--noflush", "-w", "5"]
    if test:
        args.append("--test")
    rc, out, err = run(module, args, data=payload, check_rc=False)
    if rc != 0:
        module.fail_json(msg="%s%s rejected the %s rules (nothing was changed): %s"
                         % (what + ": " if what else "", " ".join(args), family, (err or out).strip()),
                         rc=rc, stderr=err, payload=payload)
    return rc, out, err
