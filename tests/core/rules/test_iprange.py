"""Address parsing and range lookup against Python's ipaddress module."""

from __future__ import annotations

import ipaddress
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickagg.core.rules.base import RuleError, RuleSpec
from clickagg.core.rules.iprange import RangeTable, ip_blocklist, parse_ips
from tests.core.rules.events import Hit, log_frame

V4_MAPPED = 0xFFFF << 32


def reference_key(text: str) -> int | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    value = int(address)
    return value | V4_MAPPED if address.version == 4 else value


def to_v6(value: Any) -> Any:
    """An address or network in the one 128-bit space (IPv4 as IPv4-mapped IPv6)."""
    if isinstance(value, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(int(value) | V4_MAPPED)
    if isinstance(value, ipaddress.IPv4Network):
        first = ipaddress.IPv6Address(int(value.network_address) | V4_MAPPED)
        return ipaddress.IPv6Network(f"{first}/{96 + value.prefixlen}")
    return value


def keys_of(texts: list[str | None]) -> list[int | None]:
    keys, valid = parse_ips(pl.Series(texts, dtype=pl.String))
    return [
        int.from_bytes(bytes(key).ljust(16, b"\0"), "big") if ok else None
        for key, ok in zip(keys, valid, strict=True)
    ]


def spellings(address: ipaddress.IPv6Address) -> list[str]:
    """Ways to write one IPv6 address: compressed, exploded, upper case, a zone, and
    with its last 32 bits as a dotted quad."""
    last32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    head = address.exploded.rsplit(":", 2)[0]
    return [
        address.compressed,
        address.exploded,
        address.compressed.upper(),
        address.compressed + "%eth0",
        f"{head}:{last32}",
    ]


@given(st.lists(st.ip_addresses(), max_size=50))
def test_addresses_parse_to_their_value_in_every_spelling(
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    texts = []
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address):
            texts.extend(spellings(address))
        else:
            texts.append(str(address))
    assert keys_of(texts) == [reference_key(t) for t in texts]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4.5",
        "1.2.3.4:80",
        "1::2::3",
        "1:::2",
        ":1::2",
        "1::2:",
        "1:2:3:4:5:6:7",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7:8::",
        "12345::1",
        "g::1",
        "::1.2.3.256",
        "::1.2.3",
        "::a1.2.3.4",
        "1.2.3.4::",
        "::1.2.3.4:5",
    ],
)
def test_what_is_not_an_address_is_not_parsed(text: str) -> None:
    assert reference_key(text) is None
    assert keys_of([text]) == [None]


def test_nested_cidrs_keep_the_outer_one_and_lookups_find_it() -> None:
    table = RangeTable.build(
        [
            ("a", ["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32"]),
            ("b", ["10.1.0.0/16", "192.0.2.0/24", "198.51.100.7"]),
        ]
    )
    assert table.labels.to_list() == [
        "a 10.0.0.0/8",
        "b 192.0.2.0/24",
        "b 198.51.100.7/32",
        "a 2001:db8::/32",
    ]
    ips = ["10.2.3.4", "10.1.0.1", "192.0.2.9", "192.0.3.1", "2001:db8::1", "2001:db9::"]
    ips += ["198.51.100.7", "198.51.100.8", "x", "::ffff:10.0.0.1"]
    keys, valid = parse_ips(pl.Series(ips))
    assert table.lookup(keys, valid).tolist() == [0, 0, 1, -1, 3, -1, 2, -1, -1, 0]


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address = draw(st.ip_addresses())
    bits = 32 if address.version == 4 else 128
    prefix = draw(st.integers(max(0, bits - 24), bits) | st.integers(0, bits))
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


@given(
    st.lists(networks(), min_size=1, max_size=20),
    st.lists(st.ip_addresses(), max_size=40),
)
def test_lookup_agrees_with_a_plain_scan_in_one_address_space(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    probes = [*addresses, *(n.network_address for n in networks)]
    probes += [n.broadcast_address for n in networks]
    table = RangeTable.build([("list", [str(n) for n in networks])])
    keys, valid = parse_ips(pl.Series([str(a) for a in probes]))
    found = table.lookup(keys, valid)
    mapped = [to_v6(n) for n in networks]
    for address, index in zip(probes, found, strict=True):
        containing = [n for n in mapped if to_v6(address) in n]
        if not containing:
            assert index == -1, address
            continue
        kept = to_v6(ipaddress.ip_network(table.labels[int(index)].split(" ", 1)[1]))
        assert kept in containing
        assert kept.num_addresses == max(n.num_addresses for n in containing)


def test_the_rule_names_the_address_the_list_and_the_cidr() -> None:
    rule = ip_blocklist(
        RuleSpec(
            "dc",
            "ip_blocklist",
            "dc",
            {
                "lists": [
                    {"name": "datacenter-aws", "cidrs": ["203.0.113.0/24"]},
                    {"name": "abuse", "cidrs": ["2001:db8:bad::/48"]},
                ]
            },
        )
    )
    frame = log_frame(
        [
            Hit(ip="203.0.113.7"),
            Hit(ip="198.51.100.1"),
            Hit(ip=None),
            Hit(ip="2001:db8:bad::1"),
            Hit(ip="203.0.113.7"),
        ]
    )
    assert rule(frame).to_list() == [
        "203.0.113.7 in datacenter-aws 203.0.113.0/24",
        None,
        None,
        "2001:db8:bad::1 in abuse 2001:db8:bad::/48",
        "203.0.113.7 in datacenter-aws 203.0.113.0/24",
    ]


def test_a_bad_cidr_is_an_error_naming_the_rule() -> None:
    spec = RuleSpec("dc", "ip_blocklist", "dc", {"lists": [{"name": "x", "cidrs": ["1.2.3/8"]}]})
    with pytest.raises(RuleError, match="'dc'"):
        ip_blocklist(spec)


def test_an_empty_table_flags_nothing() -> None:
    table = RangeTable.build([])
    keys, valid = parse_ips(pl.Series(["1.2.3.4"]))
    assert table.lookup(keys, valid).tolist() == [-1]
    assert np.asarray(valid).tolist() == [True]
