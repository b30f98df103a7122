"""Every filter of the collection has documentation (plugins/filter/<name>.yml, what ansible-doc and the
docs site show), and the results its text states are the filter's real results."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ansible_collections.sidecar.intercept.plugins.filter.capture import FilterModule

ROOT = Path(__file__).resolve().parents[3]
FILTERS = FilterModule().filters()


def doc(name: str) -> dict:
    return yaml.safe_load((ROOT / "plugins" / "filter" / f"{name}.yml").read_text(encoding="utf-8"))


def test_every_filter_and_only_those_documented() -> None:
    documented = {p.stem for p in (ROOT / "plugins" / "filter").glob("*.yml")}
    assert documented == set(FILTERS)


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_doc_names_the_filter(name: str) -> None:
    d = doc(name)
    assert d["DOCUMENTATION"]["name"] == name
    assert f"sidecar.intercept.{name}" in d["EXAMPLES"]
    assert d["RETURN"]["_value"]["type"]


@pytest.mark.parametrize("name, args, stated", [
    ("nft_addr", ("10.0.0.1/32",), "10.0.0.1"),
    ("nft_addr", ("fd00::1/128",), "fd00::1"),
    ("nft_iface", ("br-+",), "br-*"),
    ("nft_mark", ({"mark": "0x539", "mask": "0xfff"},), "meta mark & 0xfffff539 | 0x00000539"),
    ("nft_connmark", ("0x539/0xfff",), "ct mark & 0x00000fff == 0x00000539"),
])
def test_stated_results_are_true(name: str, args: tuple, stated: str) -> None:
    assert FILTERS[name](*args) == stated
    text = yaml.safe_dump(doc(name), width=1000)
    assert stated in text.replace("\n", " ")
