"""The collection's metadata is real: no placeholder URLs, and the unit files say true things.

galaxy.yml, meta/, the roles' meta/ and templates, and the build/docs configuration files are what a user
(or Galaxy, or systemd's `systemctl status`) reads about the collection. A URL on a host name reserved
for examples (RFC 2606 / RFC 6761: example.com/.net/.org, *.example, *.invalid, *.test, *.localhost)
there is a placeholder. The systemd units' Documentation= must name something the role puts on the
host, and their Description the backend actually used.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]

# files whose URLs are metadata (relative to the repository root; globs)
METADATA = [
    "galaxy.yml",
    "meta/*.yml",
    "roles/*/meta/*.yml",
    "roles/*/templates/*",
    "execution-environment.yml",
    "docs/site/*",
    "plugins/filter/*.yml",
]
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/\s\"'<>)]*)", re.IGNORECASE)
RESERVED_HOST = re.compile(
    r"(^|\.)(example\.(com|net|org)|example|invalid|test|localhost)$", re.IGNORECASE
)


def tracked(pattern: str) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", pattern], cwd=ROOT, capture_output=True, check=True
        ).stdout
        files = [ROOT / f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an installed collection)
        files = []
    return files or sorted(ROOT.glob(pattern))


def placeholders(text: str) -> list[str]:
    found = []
    for m in URL.finditer(text):
        host = m.group(1).rsplit("@", 1)[-1].split(":", 1)[0].rstrip(".")
        if host and RESERVED_HOST.search(host):
            found.append(m.group(0))
    return found


@pytest.mark.parametrize("text, expected", [
    ("repository: https://example.invalid/sidecar/intercept", ["https://example.invalid"]),
    ("Documentation=https://docs.example.com/x", ["https://docs.example.com"]),
    ("url: http://user@host.test:8080/", ["http://user@host.test:8080"]),
    ("Documentation=file:///etc/sidecar-intercept man:nft(8)", []),
    ("homepage: https://github.com/ansible-collections/ansible.posix", []),
    ("see https://examples.org/ or https://example.com.au/", []),
])
def test_placeholder_detector(text: str, expected: list[str]) -> None:
    """The detector itself: reserved example hosts are found, real ones and file:// are not."""
    assert placeholders(text) == expected


def test_metadata_files_exist() -> None:
    files = [f for p in METADATA for f in tracked(p)]
    assert ROOT / "galaxy.yml" in files and any("templates" in f.parts for f in files)


@pytest.mark.parametrize("pattern", METADATA)
def test_no_placeholder_urls(pattern: str) -> None:
    bad = {str(f.relative_to(ROOT)): placeholders(f.read_text(encoding="utf-8", errors="replace"))
           for f in tracked(pattern) if f.is_file()}
    assert not {k: v for k, v in bad.items() if v}, "placeholder URLs in metadata"


def test_galaxy_links_are_real() -> None:
    """galaxy.yml's link fields are either absent or real (there is no public repository: absent)."""
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text(encoding="utf-8"))
    for key in ("repository", "documentation", "homepage", "issues"):
        value = galaxy.get(key)
        assert value is None or (isinstance(value, str) and value.startswith("https://")
                                 and not placeholders(value)), f"galaxy.yml {key}: {value!r}"
    assert galaxy["namespace"] == "sidecar" and galaxy["name"] == "intercept"
    assert galaxy["readme"] and (ROOT / galaxy["readme"]).is_file()
    for author in galaxy["authors"]:
        assert not placeholders(author) and "@example" not in author


# --- systemd units ----------------------------------------------------------------------------------

def role_vars(role: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("defaults", "vars"):
        path = ROOT / "roles" / role / name / "main.yml"
        if path.is_file():
            out.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return out


def render(role: str, template: str, **extra: Any) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROOT / "roles" / role / "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["bool"] = lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
    values = {k: v for k, v in role_vars(role).items() if not (isinstance(v, str) and "{{" in v)}
    values.update(ansible_managed="Ansible managed", **extra)
    # the plain path variables the templates use resolve to their literal values
    return env.get_template(template).render(values)


def unit_section(text: str, section: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


UNITS = [
    ("capture", "sidecar-capture.service.j2", "sidecar_capture_config_dir"),
    ("proxy", "sidecar-proxy.service.j2", "_sidecar_proxy_conf_dir"),
]
SIDECAR = {"mode": "redirect", "backend": "nft", "families": ["ipv4"]}
EXTRA = {
    "_sidecar_capture_python": "/usr/bin/python3",
    "_sidecar_capture_script": "/usr/local/sbin/sidecar-capture",
    "_sidecar_proxy_current": "/opt/sidecar-proxy/current",
    "_sidecar_proxy_limit_nofile": 65536,
}


@pytest.mark.parametrize("role, template, docs_var", UNITS)
def test_unit_documentation_names_what_the_role_installs(role: str, template: str, docs_var: str) -> None:
    """Documentation= has a scheme systemd accepts and, for file://, the directory the role creates."""
    unit = unit_section(render(role, template, _sidecar=SIDECAR, **EXTRA), "Unit")
    docs = " ".join(unit.get("Documentation", [])).split()
    assert docs, f"{template}: no Documentation="
    for uri in docs:
        assert re.match(r"(https?|file|info|man):", uri), uri
        assert not placeholders(uri), uri
    local = [u[len("file://"):] for u in docs if u.startswith("file://")]
    assert local == [role_vars(role)[docs_var]], docs
    tasks = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "roles" / role / "tasks").glob("*.yml"))
    assert re.search(r"path: \"\{\{ " + re.escape(docs_var) + r" \}\}\"", tasks), \
        f"the {role} role does not create {docs_var}"


@pytest.mark.parametrize("backend, word, not_word", [
    ("nft", "iptables", "nftables"), ("legacy", "iptables", "nftables"), ("nftables", "nftables", "iptables"),
])
def test_capture_unit_description_names_the_backend(backend: str, word: str, not_word: str) -> None:
    text = render("capture", "sidecar-capture.service.j2",
                  _sidecar=dict(SIDECAR, backend=backend, mode="tproxy"), **EXTRA)
    description = unit_section(text, "Unit")["Description"][0]
    assert word in description and not_word not in description and "tproxy" in description


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("families", [["ipv4"], ["ipv4", "ipv6"]])
def test_proxy_socket_units_hold_the_listeners_the_proxy_would_bind(mode: str, families: list[str]) -> None:
    """One socket unit per direction: the proxy's ports and families, Transparent= only for TPROXY inbound."""
    sidecar = dict(SIDECAR, mode=mode, families=families, inbound_port=15006, outbound_port=15001)
    service = unit_section(render("proxy", "sidecar-proxy.service.j2", _sidecar=sidecar, **EXTRA), "Service")
    assert service["CapabilityBoundingSet"] == [""] and service["AmbientCapabilities"] == [""]
    names = []
    for sock in role_vars("proxy")["_sidecar_proxy_sockets"]:
        text = render("proxy", "sidecar-proxy.socket.j2", _sidecar=sidecar, _sidecar_proxy_direction=sock["direction"],
                      **EXTRA)
        s = unit_section(text, "Socket")
        port = sidecar[f"{sock['direction']}_port"]
        assert s["ListenStream"] == [f"0.0.0.0:{port}"] + ([f"[::]:{port}"] if "ipv6" in families else [])
        assert s["BindIPv6Only"] == ["ipv6-only"]  # the proxy's own IPv6 listener is IPV6_V6ONLY
        assert s["FileDescriptorName"] == [sock["direction"]]
        assert s["Service"] == [role_vars("proxy")["_sidecar_proxy_service"]]
        assert s.get("Transparent", []) == (["yes"] if mode == "tproxy" and sock["direction"] == "inbound" else [])
        assert "ReusePort" not in s  # the proxy's own listeners do not use SO_REUSEPORT
        assert sock["path"].endswith("/" + sock["unit"])
        names.append(sock["unit"])
    assert service["Sockets"] == [" ".join(names)]
    unit = unit_section(render("proxy", "sidecar-proxy.service.j2", _sidecar=sidecar, **EXTRA), "Unit")
    assert unit["Requires"] == [" ".join(names)]
