"""Fetching audio by URL without letting the URL reach inside the network.

A URL given to the API or the client is fetched by echoq's own process, so a caller could point
it at Redis, a cloud metadata service or an admin page. :func:`fetch` therefore:

- resolves the host once, refuses it when any address it resolves to is loopback, private,
  link-local, multicast, unspecified or reserved (IPv4-mapped IPv6 addresses are judged as the
  IPv4 address they carry), and then connects to the very address it checked, so a second DNS
  answer cannot swap in an internal one;
- does the same for every redirect hop, and refuses a redirect to anything but http(s);
- lets through hosts and networks named in ``ECHOQ_FETCH_ALLOW_HOSTS`` (a host name matches as
  written in the URL; an address or CIDR network matches the resolved address);
- holds the whole fetch — resolving, connecting, every hop, every byte of the body — to one
  total deadline, and stops reading as soon as the body passes the size limit.

Every refusal is an :class:`~worker.errors.UnsafeURL` or :class:`~worker.errors.AudioError` whose
message says why. URLs in messages lose their user info and query, which may hold credentials.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

from worker.errors import AudioError, UnsafeURL

__all__ = ["AllowList", "check", "fetch", "refusal", "redact"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_PIECE = 64 * 1024
#: what no HTTP request line can carry (http.client would refuse it mid-fetch)
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class AllowList:
    """Hosts (by name) and networks (by resolved address) that may be fetched although internal."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> AllowList:
        """From ``"audio.internal,10.1.0.0/16,127.0.0.1"``: names, addresses or CIDR networks."""
        items = entries.split(",") if isinstance(entries, str) else list(entries)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for item in (i.strip().lower() for i in items):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                hosts.add(item.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        return host.lower().rstrip(".") in self.hosts or any(address in n for n in self.networks)


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` must not be fetched from, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, bad in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                      ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                      ("reserved", address.is_reserved), ("private", address.is_private)):
        if bad:
            return kind
    if not address.is_global:  # shared (carrier NAT), documentation, 6to4 of private, ...
        return "non-public"
    return None


def redact(url: str) -> str:
    """``url`` without user info, query or fragment: safe to show in an error or a log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def fetch(url: str, *, max_bytes: int, deadline_s: float, allow: AllowList | None = None,
          max_redirects: int = MAX_REDIRECTS) -> bytes:
    """The body of ``url`` (http or https, status 200) under the rules in the module docstring."""
    allow = allow or AllowList()
    deadline = time.monotonic() + deadline_s
    current = url
    for _hop in range(max_redirects + 1):
        conn, resp = _request(current, allow, deadline, deadline_s)
        try:
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise AudioError(f"fetching {redact(current)}: HTTP {resp.status} without a Location")
                target = urljoin(current, location.strip())
                if urlsplit(target).scheme.lower() not in ("http", "https"):
                    raise UnsafeURL(f"refused to fetch {redact(url)}: it redirects to a "
                                    f"{urlsplit(target).scheme or 'schemeless'}: URL; only http(s) is followed")
                current = target
                continue
            if resp.status != 200:
                raise AudioError(f"fetching audio from {redact(current)} answered HTTP {resp.status}")
            return _body(conn, resp, max_bytes, deadline, deadline_s, current)
        finally:
            resp.close()
            conn.close()
    raise UnsafeURL(f"fetching {redact(url)} was redirected more than {max_redirects} times")


def check(url: str, *, allow: AllowList | None = None, resolve: bool = True, deadline_s: float = 5.0) -> None:
    """Refuse ``url`` as :func:`fetch` would before sending anything, without fetching it.

    Its form (http or https, a host, a valid port, no spaces or control characters) and, when the
    host is an address, that address are always checked; a host name is resolved and its
    addresses checked when ``resolve`` is true. A name that does not resolve (here and now) is
    not refused: the fetch, where and when it runs, says so."""
    allow = allow or AllowList()
    scheme, host, port, parts = _split(url)
    try:
        literal = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        literal = None
    if literal is None and not resolve:
        return
    deadline = time.monotonic() + deadline_s
    try:
        _checked_addresses(url, host, port, allow, deadline, deadline_s)
    except UnsafeURL:
        raise
    except AudioError:
        return


def _split(url: str) -> tuple[str, str, int, SplitResult]:
    """Scheme, host, port and parts of a URL echoq may fetch; :class:`UnsafeURL` saying why not."""
    if _UNSENDABLE.search(url):
        raise UnsafeURL(f"not a URL echoq can fetch: {redact(url)} contains a space or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a URL echoq can fetch: {exc}") from exc
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https"):
        raise UnsafeURL(f"refused to fetch {redact(url)}: only http and https URLs are fetched, not {scheme or 'none'}:")
    if not host:
        raise UnsafeURL(f"refused to fetch {redact(url)}: it has no host")
    return scheme, host, port or (443 if scheme == "https" else 80), parts


def _request(url: str, allow: AllowList, deadline: float,
             deadline_s: float) -> tuple[_PinnedConnection, http.client.HTTPResponse]:
    scheme, host, port, parts = _split(url)
    addresses = _checked_addresses(url, host, port, allow, deadline, deadline_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = _PinnedConnection(scheme, host, port, addresses, _remaining(deadline, deadline_s, url))
    try:
        conn.request("GET", path, headers={"User-Agent": "echoq", "Accept": "*/*"})
        conn.wait_at_most(_remaining(deadline, deadline_s, url))
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:  # first: a certificate error is a ValueError too
        conn.close()
        raise _failed(exc, url, deadline, deadline_s) from exc
    except ValueError as exc:  # http.client refuses a path with characters HTTP cannot carry
        conn.close()
        raise UnsafeURL(f"not a URL echoq can fetch: {redact(url)} ({type(exc).__name__})") from exc


def _checked_addresses(url: str, host: str, port: int, allow: AllowList, deadline: float,
                       deadline_s: float) -> list[str]:
    """Resolve ``host`` once; refuse it when any of its addresses is internal and not allowed."""
    infos = _resolve(url, host, port, deadline, deadline_s)
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise AudioError(f"could not fetch audio from {redact(url)}: {host} has no address")
    for address in addresses:
        why = refusal(address)
        if why is not None and not allow.allows(host, address):
            raise UnsafeURL(f"refused to fetch {redact(url)}: {host} resolves to {address}, a {why} address "
                            "(add the host to ECHOQ_FETCH_ALLOW_HOSTS if it is trusted)")
    return [str(a) for a in addresses]


def _resolve(url: str, host: str, port: int, deadline: float, deadline_s: float) -> list[Any]:
    # getaddrinfo takes no timeout; a thread lets the deadline hold even when DNS hangs.
    out: list[object] = []

    def lookup() -> None:
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            out.append(exc)

    thread = threading.Thread(target=lookup, daemon=True, name="echoq-fetch-dns")
    thread.start()
    thread.join(_remaining(deadline, deadline_s, url))
    if not out:
        raise AudioError(f"could not fetch audio from {redact(url)}: it took longer than the deadline of {deadline_s:g} s")
    if isinstance(out[0], OSError | UnicodeError):
        raise AudioError(f"could not fetch audio from {redact(url)}: {host} does not resolve")
    return list(out[0])  # type: ignore[call-overload]


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a checked address, with the URL's host in Host and in TLS checks."""

    def __init__(self, scheme: str, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._scheme, self._addresses = scheme, addresses
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        sock = self._first_to_answer()
        if self._scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        # http.client forgets ``sock`` once a response says the connection closes; the body is
        # still read from it, and its timeout must keep following the deadline.
        self.sock = self.pinned = sock

    def wait_at_most(self, seconds: float) -> None:
        """Bound the next socket operation to ``seconds``."""
        if self.pinned is not None:
            self.pinned.settimeout(seconds)

    def _first_to_answer(self) -> socket.socket:
        # Only the addresses already checked are tried, in the resolver's order.
        error: OSError = OSError("no address")
        for address in self._addresses:
            try:
                return socket.create_connection((address, self.port), self.timeout)
            except OSError as exc:
                error = exc
        raise error


def _body(conn: _PinnedConnection, resp: http.client.HTTPResponse, max_bytes: int, deadline: float,
          deadline_s: float, url: str) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise AudioError(f"audio at {redact(url)} is {length} bytes, over the limit of {max_bytes} bytes")
    body = bytearray()
    try:
        while True:
            # Each read waits at most for what is left of the deadline, so a slow body cannot hold it.
            conn.wait_at_most(_remaining(deadline, deadline_s, url))
            piece = resp.read1(_PIECE)
            if not piece:
                return bytes(body)
            body += piece
            if len(body) > max_bytes:
                raise AudioError(f"audio at {redact(url)} is over the limit of {max_bytes} bytes")
    except (OSError, http.client.HTTPException) as exc:
        raise _failed(exc, url, deadline, deadline_s) from exc


def _remaining(deadline: float, deadline_s: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AudioError(f"could not fetch audio from {redact(url)}: it took longer than the deadline of {deadline_s:g} s")
    return left


def _failed(exc: Exception, url: str, deadline: float, deadline_s: float) -> AudioError:
    if isinstance(exc, TimeoutError | socket.timeout) or time.monotonic() >= deadline:
        return AudioError(f"could not fetch audio from {redact(url)}: it took longer than the deadline of {deadline_s:g} s")
    return AudioError(f"could not fetch audio from {redact(url)}: {type(exc).__name__}")
