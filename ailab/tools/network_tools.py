"""Tools that reach the network: host lookup with a TCP ping, and HTTP latency."""

from __future__ import annotations

import ssl
import time
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field

from ailab.tools import network
from ailab.tools.catalogue import tool
from ailab.tools.errors import ToolError
from ailab.tools.policy import ToolPolicy


@tool()
def lookup_hostname(
    policy: ToolPolicy,
    hostname: Annotated[str, Field(description="A host name such as example.com, or an IP")],
) -> dict[str, Any]:
    """Resolve a host name to all its IP addresses and time a TCP connection to it (port 443,
    then 80). ping_ms is null when neither port answers."""
    allow_private = policy.net_allow_private
    host = network.check_host_text(
        (urlsplit(hostname).hostname or "") if "://" in hostname else hostname
    )
    addresses = network.vetted_addresses(host, 443, allow_private=allow_private)
    ping_ms, ping_port = None, None
    for port in network.PUBLIC_PORTS[::-1]:
        start = time.monotonic()
        try:
            network.connect(
                addresses[0], port, network.NET_TIMEOUT_S / 2, allow_private=allow_private
            ).close()
        except OSError:
            continue
        ping_ms, ping_port = round((time.monotonic() - start) * 1000, 1), port
        break
    return {
        "hostname": host,
        "ip": [str(ip) for ip in addresses],
        "ping_ms": ping_ms,
        "ping_port": ping_port,
        "ping_method": "TCP connect time",
    }


@tool()
def measure_http_latency(
    policy: ToolPolicy,
    url: Annotated[str, Field(description="A host name or an http(s) URL, e.g. example.com")],
) -> dict[str, Any]:
    """Time one HTTP GET: connection plus time to the status line. Returns the status code;
    redirects are not followed and the body is never read."""
    allow_private = policy.net_allow_private
    target = network.parse_target(url, allow_private=allow_private)
    addresses = network.vetted_addresses(target.host, target.port, allow_private=allow_private)
    timeout = network.NET_TIMEOUT_S
    start = time.monotonic()
    deadline = start + timeout
    errors = []
    for ip in addresses:
        try:
            status, connect_ms = network.http_status(
                target, ip, deadline, allow_private=allow_private
            )
        except TimeoutError:
            raise ToolError(f"no answer from {target.host} within {timeout:g} s") from None
        except ssl.SSLError as exc:
            raise ToolError(f"TLS with {target.host} failed: {exc.reason or exc}") from None
        except OSError as exc:
            errors.append(f"{ip}: {exc.strerror or exc}")
            continue
        result = {
            "url": f"{target.scheme}://{target.host}:{target.port}{target.request_path}",
            "ip": str(ip),
            "status_code": status,
            "latency_ms": round((time.monotonic() - start) * 1000, 1),
            "connect_ms": round(connect_ms, 1),
        }
        if 300 <= status < 400:
            result["redirect_not_followed"] = True
        return result
    raise ToolError(f"cannot connect to {target.host}:{target.port} ({'; '.join(errors)})")
