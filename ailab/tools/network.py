"""The network policy (SSRF): which addresses tools may reach, and reaching only those.

A name is resolved once, every address it stands for is vetted, and the connection goes
to a vetted address (its peer checked again), so a second lookup cannot redirect it.
``allow_private`` is the policy's AILAB_NET_ALLOW_PRIVATE.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ailab.tools.errors import SandboxError, ToolError

NET_TIMEOUT_S = 5.0
PUBLIC_PORTS = (80, 443)
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- Judging an address ----------------------------------------------------------------


def _addresses_to_judge(ip: IPAddress) -> list[IPAddress]:
    """The address, or the IPv4 address it only translates (mapped, NAT64, compatible);
    6to4 and Teredo addresses are judged together with the IPv4 addresses inside."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return [ip]
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in NAT64_PREFIX or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    found: list[IPAddress] = [ip]
    if ip.sixtofour:
        found.append(ip.sixtofour)
    if ip.teredo:
        found.extend(ip.teredo)
    return found


def address_problem(ip: IPAddress) -> str | None:
    """Why a network tool may not reach this address by default, or None if it may."""
    for candidate in _addresses_to_judge(ip):
        if candidate in METADATA_ADDRESSES:
            return "a cloud metadata address"
        for attribute in (
            "is_loopback",
            "is_unspecified",
            "is_link_local",
            "is_multicast",
            "is_private",
            "is_reserved",
        ):
            if getattr(candidate, attribute):
                return f"a {attribute[3:].replace('_', '-')} address"
        if not candidate.is_global:
            return "not a public address"
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """An IP address in any spelling (127.1, 2130706433, 0x7f000001, [::1]), else None."""
    text = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def check_host_text(host: str) -> str:
    """The host name, normalised; ToolError when it cannot be one."""
    host = host.strip().rstrip(".").lower()
    if not host or len(host) > 253 or any(c.isspace() or ord(c) < 33 for c in host):
        raise ToolError(f"{host!r} is not a valid host name; give something like example.com")
    return host


# --- Resolving and connecting ----------------------------------------------------------


def _resolve_host(host: str, port: int) -> list[IPAddress]:
    """All addresses of a name, with the hard timeout getaddrinfo itself lacks."""
    box: list[Any] = []

    def work() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            box.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(NET_TIMEOUT_S)
    if not box:
        raise ToolError(f"looking up {host} took longer than {NET_TIMEOUT_S:g} s")
    if isinstance(box[0], OSError):
        raise ToolError(f"cannot resolve {host}: {box[0]}; check the spelling")
    addresses: list[IPAddress] = []
    for *_, sockaddr in box[0]:
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ToolError(f"{host} has no addresses")
    return addresses


def _vet(ip: IPAddress, host: str, allow_private: bool) -> None:
    problem = None if allow_private else address_problem(ip)
    if problem:
        named = f"{host} is" if host == str(ip) else f"{host} is {ip},"
        raise SandboxError(
            f"{named} {problem}; network tools only reach public internet addresses "
            "(the user can allow private ones with AILAB_NET_ALLOW_PRIVATE=1)"
        )


def vetted_addresses(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
    """Every address the host stands for, each one checked; connect only to these."""
    literal = parse_ip_literal(host)
    addresses = [literal] if literal is not None else _resolve_host(host, port)
    for ip in addresses:
        _vet(ip, host, allow_private)
    return addresses


def connect(ip: IPAddress, port: int, timeout: float, *, allow_private: bool) -> socket.socket:
    """A TCP connection to this exact, already vetted address; no name is resolved again."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(max(timeout, 0.01))
    try:
        sock.connect((str(ip), port))
        _vet(ipaddress.ip_address(sock.getpeername()[0]), str(ip), allow_private)
    except BaseException:
        sock.close()
        raise
    return sock


# --- One HTTP request ------------------------------------------------------------------


class Target(NamedTuple):
    scheme: str
    host: str
    port: int
    request_path: str


def parse_target(text: str, *, allow_private: bool) -> Target:
    """An http(s) URL (or a bare host) to measure; refused schemes, users and ports raise."""
    text = text.strip()
    if any(c.isspace() or ord(c) < 32 for c in text):
        raise ToolError("the URL contains spaces or control characters")
    parts = urlsplit(text if "://" in text else f"https://{text}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ToolError(f"only http and https URLs can be measured, not {scheme!r}")
    if parts.username or parts.password:
        raise ToolError("URLs with a user name or password are refused")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ToolError(f"{text!r} has an invalid port") from None
    if port not in PUBLIC_PORTS and not allow_private:
        raise SandboxError(
            f"port {port} is refused; only ports 80 and 443 are measured "
            "(AILAB_NET_ALLOW_PRIVATE=1 allows any port)"
        )
    host = check_host_text(parts.hostname or "")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, path)


def _read_status_line(sock: socket.socket, deadline: float) -> bytes:
    """The first response line; a hard deadline, however slowly the server drips bytes."""
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(1024)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > 8192:
            break
    return buffer.split(b"\n", 1)[0].strip()


def http_status(
    target: Target, ip: IPAddress, deadline: float, *, allow_private: bool
) -> tuple[int, float]:
    """Connect to ``ip``, send one GET, return (status, connect ms); the body is never read."""
    start = time.monotonic()
    sock = connect(ip, target.port, deadline - start, allow_private=allow_private)
    connect_ms = (time.monotonic() - start) * 1000
    try:
        if target.scheme == "https":
            context = ssl.create_default_context()
            literal = parse_ip_literal(target.host)
            sni = str(literal) if literal is not None else target.host
            sock = context.wrap_socket(sock, server_hostname=sni)
        default = 443 if target.scheme == "https" else 80
        host = f"[{target.host}]" if ":" in target.host else target.host
        host = host if target.port == default else f"{host}:{target.port}"
        request = (
            f"GET {target.request_path} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: AI-Lab-latency-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(request.encode("ascii", "replace"))
        line = _read_status_line(sock, deadline)
    finally:
        sock.close()
    fields = line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ToolError(f"{target.host} did not answer with HTTP")
    return int(fields[1]), connect_ms
