"""Render both backends' templates for every case in tests/golden/cases.yml: rules.j2 (iptables-restore,
one file per family: <case>.ipv4.rules, <case>.ipv6.rules) and rules.nft.j2 (native nftables, one
file for both families: <case>.nft).

    python tests/golden/regen.py          # rewrite the golden files
    python tests/golden/regen.py --check  # exit 1 when a golden file differs (what the unit test does)

Each case's settings go through the collection's one validator (plugins/module_utils/settings.py,
no host: IPv6 auto renders both families), and the template is rendered with Ansible's template
settings (trim_blocks), so the output equals what the role writes to /etc/sidecar-intercept/rules.v4|v6.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins" / "module_utils"))
from settings import effective  # noqa: E402  (plain import: also runs outside the collection path)
import rules  # noqa: E402

ROLE = ROOT / "roles" / "capture"
GOLDEN = Path(__file__).resolve().parent
FAMILIES = ("ipv4", "ipv6")


def resolved(overrides: dict) -> dict:
    settings, errors, _warnings = effective(overrides)
    if errors:
        raise ValueError("; ".join(errors))
    return settings


def render(overrides: dict, family: str | None, template: str = "rules.j2") -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")),
                             trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    # the collection's filters (plugins/filter/capture.py), under the names the templates use
    env.filters.update({"sidecar.intercept.capture_rules": rules.build, "sidecar.intercept.capture_sets": rules.sets,
                        "sidecar.intercept.nft_addr": rules.nft_addr, "sidecar.intercept.nft_mark": rules.nft_mark,
                        "sidecar.intercept.nft_connmark": rules.nft_connmark, "sidecar.intercept.nft_iface": rules.nft_iface})
    variables = {"ansible_facts": {"sidecar_settings": resolved(overrides)}, "_sidecar_capture_family": family}
    return env.get_template(template).render(**variables)


def expected() -> dict[Path, str]:
    cases = yaml.safe_load((GOLDEN / "cases.yml").read_text())
    out = {}
    for name, settings in cases.items():
        for family in FAMILIES:
            out[GOLDEN / "cases" / f"{name}.{family}.rules"] = render(settings or {}, family)
        out[GOLDEN / "cases" / f"{name}.nft"] = render(settings or {}, None, "rules.nft.j2")
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    bad = 0
    for path, text in expected().items():
        if check:
            if not path.exists() or path.read_text() != text:
                print(f"differs: {path.relative_to(ROOT)}")
                bad += 1
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
