"""Where a webhook may point: never at loopback, link-local, private or other internal addresses (server-side
request forgery), checked on the URL, on every address its name resolves to, and again at each delivery,
whose connection is pinned to the address just checked (no second lookup an attacker could change)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_URL_CHARS = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class TargetRefused(Exception):
    """The URL may not receive webhooks; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class TargetPolicy:
    """Which non-public addresses are allowed anyway (self-hosting, tests): all of them, or some networks."""

    allow_all_private: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def allows_private(self) -> bool:
        return self.allow_all_private or bool(self.allowed_networks)

    def permits(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address):
            # An IPv4 address inside IPv6 (mapped, 6to4, NAT64) is judged as the IPv4 address it reaches.
            embedded = address.ipv4_mapped or address.sixtofour or (
                ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None)
            if embedded is not None:
                return self.permits(embedded)
        if address.is_global and not address.is_multicast:
            return True
        if self.allow_all_private:
            return not address.is_unspecified and not address.is_multicast
        return any(address in net for net in self.allowed_networks)


def parse_policy(text: str) -> TargetPolicy:
    """`WEBHOOK_ALLOW_PRIVATE`: `false` (default), `true` (any private target), or CIDRs (`127.0.0.1/32,10.0.0.0/8`)."""
    value = (text or "").strip().lower()
    if value in ("", "false", "0", "no", "off"):
        return TargetPolicy()
    if value in ("true", "1", "yes", "on"):
        return TargetPolicy(allow_all_private=True)
    return TargetPolicy(allowed_networks=tuple(ipaddress.ip_network(p.strip(), strict=False)
                                               for p in value.split(",") if p.strip()))


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int


def check_url(url: str, policy: TargetPolicy) -> Target:
    """The URL's shape: https (http only where private targets are allowed), a host, no credentials."""
    if len(url) > MAX_URL_CHARS:
        raise TargetRefused("invalid_webhook_url", f"the URL is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused("invalid_webhook_url", f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.hostname:
        raise TargetRefused("invalid_webhook_url", "the URL must be https://host/...")
    if scheme == "http" and not policy.allows_private:
        raise TargetRefused("invalid_webhook_url", "webhook URLs must use https")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("invalid_webhook_url", "the URL must not carry credentials")
    if parts.fragment:
        raise TargetRefused("invalid_webhook_url", "the URL must not carry a fragment")
    return Target(url=url, scheme=scheme, host=parts.hostname, port=port or (443 if scheme == "https" else 80))


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _literal(host: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return []


async def resolve(target: Target, policy: TargetPolicy, resolver: Resolver = system_resolver) -> list[IPAddress]:
    """Every address the host names, each one allowed; TargetRefused otherwise."""
    addresses = _literal(target.host)
    if not addresses:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await resolver(target.host, target.port)]
        except (OSError, UnicodeError) as exc:
            raise TargetRefused("webhook_target_unresolvable", f"{target.host} does not resolve: {exc}") from None
    if not addresses:
        raise TargetRefused("webhook_target_unresolvable", f"{target.host} does not resolve")
    refused = [str(a) for a in addresses if not policy.permits(a)]
    if refused:
        raise TargetRefused("webhook_target_refused",
                            f"{target.host} points at a private, loopback or link-local address ({refused[0]})")
    if target.scheme == "http" and not all(not a.is_global and policy.permits(a) for a in addresses):
        raise TargetRefused("invalid_webhook_url", "webhook URLs must use https")
    return addresses


async def check_target(url: str, policy: TargetPolicy, resolver: Resolver = system_resolver) -> tuple[Target,
                                                                                                    list[IPAddress]]:
    target = check_url(url, policy)
    return target, await resolve(target, policy, resolver)


def pinned_url(target: Target, address: IPAddress) -> str:
    """The URL with its host replaced by the checked address (the Host header and TLS SNI keep the name)."""
    parts = urlsplit(target.url)
    host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    netloc = f"{host}:{target.port}"
    return parts._replace(netloc=netloc).geturl()
