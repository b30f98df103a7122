"""Every role's meta/argument_specs.yml and defaults/main.yml stay in step.

For each role under roles/: every option of the `main` entry point that is not required has a default,
and defaults/main.yml holds the same value; every variable in defaults/main.yml is documented as an
option; defaults match the declared type and choices. Across roles, a variable defined in more than one
role has the same default everywhere. The shared settings of plugins/module_utils/settings.py are the
exception: their argument_specs entries are generated from it (tests/unit/settings/test_specs.py checks
them) and no defaults/main.yml may define them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ansible_collections.sidecar.intercept.plugins.module_utils.settings import BY_NAME as SHARED

ROOT = Path(__file__).resolve().parents[3]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir()) if (ROOT / "roles").is_dir() else []

TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "list": (list,),
    "dict": (dict,),
    "path": (str,),
}


def load(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def specs(role: Path) -> dict[str, Any]:
    path = role / "meta" / "argument_specs.yml"
    assert path.is_file(), f"{role.name}: meta/argument_specs.yml is missing"
    data = load(path) or {}
    assert "main" in data.get("argument_specs", {}), f"{role.name}: argument_specs has no 'main' entry point"
    return data["argument_specs"]


def defaults(role: Path) -> dict[str, Any]:
    path = role / "defaults" / "main.yml"
    return (load(path) or {}) if path.is_file() else {}


def test_there_are_roles():
    assert ROLES, "no roles found under roles/"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_option_has_the_same_default_in_defaults(role: Path):
    options = specs(role)["main"].get("options", {})
    dflt = defaults(role)
    problems = []
    for name, opt in options.items():
        if name in SHARED:
            if name in dflt:
                problems.append(f"{name}: a shared setting (plugins/module_utils/settings.py) must not have a role default")
            continue
        if opt.get("required"):
            if name in dflt:
                problems.append(f"{name}: required, but defaults/main.yml sets it")
            continue
        if "default" not in opt:
            problems.append(f"{name}: no default in argument_specs")
        elif name not in dflt:
            problems.append(f"{name}: missing from defaults/main.yml")
        elif dflt[name] != opt["default"] or type(dflt[name]) is not type(opt["default"]):
            problems.append(f"{name}: argument_specs default {opt['default']!r} != defaults/main.yml {dflt[name]!r}")
    assert not problems, f"{role.name}: " + "; ".join(problems)


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_default_is_documented(role: Path):
    options = specs(role)["main"].get("options", {})
    undocumented = sorted(set(defaults(role)) - set(options))
    assert not undocumented, f"{role.name}: defaults/main.yml has undocumented variables {undocumented}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_defaults_match_type_and_choices(role: Path):
    problems = []
    for entry, spec in specs(role).items():
        for name, opt in (spec.get("options") or {}).items():
            assert opt.get("description"), f"{role.name}: {entry}.{name} has no description"
            if "default" not in opt:
                continue
            value, kind = opt["default"], opt.get("type", "str")
            allowed = TYPES.get(kind)
            type_ok = isinstance(value, allowed) and not (kind == "int" and isinstance(value, bool)) if allowed else True
            if not type_ok and value is not None:
                problems.append(f"{entry}.{name}: default {value!r} is not of type {kind}")
            if "choices" in opt and value not in opt["choices"]:
                problems.append(f"{entry}.{name}: default {value!r} not in choices {opt['choices']}")
    assert not problems, f"{role.name}: " + "; ".join(problems)


def test_shared_variables_have_one_default():
    seen: dict[str, tuple[str, Any]] = {}
    problems = []
    for role in ROLES:
        for name, value in defaults(role).items():
            if name in seen and seen[name][1] != value:
                problems.append(f"{name}: {seen[name][0]}={seen[name][1]!r} but {role.name}={value!r}")
            seen.setdefault(name, (role.name, value))
    assert not problems, "; ".join(problems)
