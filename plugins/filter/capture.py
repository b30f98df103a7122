# Copyright (c) sidecar.intercept developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that give the capture templates the rules model (plugins/module_utils/rules.py)."""

from __future__ import annotations

from ansible_collections.sidecar.intercept.plugins.module_utils.rules import (
    build,
    nft_addr,
    nft_connmark,
    nft_iface,
    nft_mark,
    sets,
)


def capture_rules(settings):
    """The rules model for resolved settings (ansible_facts.sidecar_settings)."""
    return build(settings)


def capture_sets(model):
    """The named sets of a rules model, as the nftables backend declares them."""
    return sets(model)


class FilterModule:
    def filters(self):
        return {"capture_rules": capture_rules, "capture_sets": capture_sets, "nft_addr": nft_addr,
                "nft_mark": nft_mark, "nft_connmark": nft_connmark, "nft_iface": nft_iface}
