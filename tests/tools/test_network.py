"""The network policy: the address rule in every spelling, and the check after connecting."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from ailab.tools import SandboxError, network

# --- address rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "[::1]",
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "::127.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "169.254.169.254",
        "fd00:ec2::254",
        "0.0.0.0",
        "0",
        "::",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "ff02::1",
        "fe80::1%eth0",
        "fc00::1",
        "240.0.0.1",
        "255.255.255.255",
    ],
)
def test_non_public_addresses_are_refused_in_every_spelling(spelling: str) -> None:
    ip = network.parse_ip_literal(spelling)
    assert ip is not None
    assert network.address_problem(ip) is not None


def test_odd_spellings_parse_to_the_address_they_mean() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    for spelling in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.0.0.1"):
        assert network.parse_ip_literal(spelling) == loopback


def test_cloud_metadata_addresses_are_named_as_such() -> None:
    for spelling in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        ip = network.parse_ip_literal(spelling)
        assert ip is not None
        assert network.address_problem(ip) == "a cloud metadata address"


@pytest.mark.parametrize(
    "spelling", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed(spelling: str) -> None:
    ip = network.parse_ip_literal(spelling)
    assert ip is not None
    assert network.address_problem(ip) is None


def test_host_names_are_not_mistaken_for_addresses() -> None:
    for name in ("example.com", "deadbeef", "localhost", "a.b.c.d"):
        assert network.parse_ip_literal(name) is None


def test_the_peer_address_is_checked_after_connecting() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(SandboxError, match="loopback"):
            network.connect(ipaddress.ip_address("127.0.0.1"), port, 1.0, allow_private=False)
