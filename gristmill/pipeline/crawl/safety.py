"""Where the crawler may connect: public addresses only, unless an allow-list says otherwise.

A page can link or redirect anywhere, including `http://127.0.0.1:8787/` or a cloud metadata
address; a crawler that follows it blindly is a server-side request forgery tool. The check lives
in the network layer: every TCP connection httpx opens goes through `GuardedNetworkBackend`, which
resolves the host itself, keeps only the permitted addresses and connects to one of those IPs, so
the address checked is the address connected to (no second DNS lookup to race), on the first
request and on every redirect hop alike.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")


class UnsafeAddressError(ConnectionError):
    """A connection the policy refuses: the host resolves only to addresses that are not allowed."""


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses the crawler may connect to.

    Public (globally routable) addresses are always allowed. Anything else (private, loopback,
    link-local, multicast, reserved) is allowed only when it lies in `networks`, or, for one exact
    address and port, in `endpoints` (how a crawl of a locally served folder admits its own server
    and nothing else on that machine).
    """

    networks: tuple[IPNetwork, ...] = ()
    endpoints: frozenset[tuple[IPAddress, int]] = field(default_factory=frozenset)

    @classmethod
    def from_strings(cls, networks: Iterable[str], endpoints: Iterable[tuple[str, int]] = ()) -> AddressPolicy:
        """Parse `["127.0.0.1/32", "10.0.0.0/8"]`; a bad entry is a ValueError naming it."""
        parsed = []
        for entry in networks:
            try:
                parsed.append(ipaddress.ip_network(entry, strict=False))
            except ValueError as error:
                raise ValueError(f"allow_networks: {entry!r} is not an address or network ({error})") from None
        return cls(tuple(parsed), frozenset((ipaddress.ip_address(ip), port) for ip, port in endpoints))

    def allows(self, address: str, port: int) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if (ip, port) in self.endpoints:
            return True
        if any(ip in network for network in self.networks):
            return True
        return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in resolver order, without duplicates."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {error}") from error
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    return addresses


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses `policy` allows.

    TLS still uses the URL's host name for SNI and certificate checks (httpcore passes it to
    `start_tls` separately), so connecting by IP changes nothing for HTTPS.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            with anyio.fail_after(timeout):
                addresses = await resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} took longer than {timeout}s") from None
        allowed = [a for a in addresses if self.policy.allows(a, port)]
        if not allowed:
            raise UnsafeAddressError(
                f"refused {host}:{port}: resolves to {', '.join(addresses) or 'nothing'}, "
                "not a public address and not in allow_networks"
            )
        last_error: Exception | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as error:
                last_error = error
        raise last_error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise UnsafeAddressError(f"refused unix socket {path!r}: the crawler connects over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport with its connection pool built on `GuardedNetworkBackend`.

    Proxies from the environment are never used (a proxy would connect on the crawler's behalf,
    past the address check).
    """

    def __init__(self, policy: AddressPolicy, max_connections: int) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=GuardedNetworkBackend(policy),
        )
