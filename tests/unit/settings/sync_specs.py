"""Write the shared settings into each role's meta/argument_specs.yml from their one definition.

    python tests/unit/settings/sync_specs.py          # rewrite the generated blocks
    python tests/unit/settings/sync_specs.py --check  # exit 1 when a block differs (the unit test does this)

plugins/module_utils/settings.py defines every public setting (type, default, choices, description).
The roles document them in argument_specs (for ansible-doc and the role's argument validation) between
the markers below; nothing between them is edited by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "plugins" / "module_utils"))
from settings import SETTINGS  # noqa: E402  (a plain import: this script runs outside the collection path)

BEGIN = "      # BEGIN shared settings: generated from plugins/module_utils/settings.py by tests/unit/settings/sync_specs.py"
END = "      # END shared settings"


def _flow(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def block(role: str) -> str:
    lines = [BEGIN]
    for s in SETTINGS:
        if role not in s.roles:
            continue
        spec = s.spec()
        lines.append(f"      {s.name}:")
        lines.append("        description:")
        for para in spec["description"]:
            text = yaml.safe_dump([para], width=100, default_flow_style=False).rstrip("\n")
            lines.extend("          " + line for line in text.splitlines())
        for key in ("type", "elements", "choices", "default"):
            if key in spec:
                lines.append(f"        {key}: {_flow(spec[key])}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def expected(path: Path) -> str:
    role = path.parents[1].name
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END)
    return text[:start] + block(role) + text[end + len(END) + 1:]


def spec_files() -> list[Path]:
    return sorted((ROOT / "roles").glob("*/meta/argument_specs.yml"))


def main(argv: list[str]) -> int:
    bad = 0
    for path in spec_files():
        want = expected(path)
        if "--check" in argv:
            if path.read_text() != want:
                print(f"differs: {path.relative_to(ROOT)} (run python tests/unit/settings/sync_specs.py)")
                bad += 1
        elif path.read_text() != want:
            path.write_text(want)
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
