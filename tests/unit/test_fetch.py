"""URL fetching refuses internal addresses, bad redirects, slow and endless bodies."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from producer.fetch import AllowList, fetch, redact, refusal
from tests.hostile_server import hostile_server, self_signed
from worker.errors import AudioError, UnsafeURL

#: the test servers listen on 127.0.0.2, which only this allow-list entry lets through
TRUSTED = AllowList.parse("127.0.0.2")


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"),
    ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
    ("240.0.0.1", "reserved"), ("100.64.0.1", "non-public"), ("::1", "loopback"), ("::", "unspecified"),
    ("fe80::1", "link-local"), ("fc00::1", "private"), ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
])
def test_internal_addresses_are_refused_with_their_kind(address: str, why: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_allow_list_matches_names_as_written_and_networks_by_address() -> None:
    allow = AllowList.parse(" Audio.Internal. ,10.1.0.0/16, ::1 ,")
    assert allow.allows("audio.internal", ipaddress.ip_address("10.9.9.9"))
    assert allow.allows("other", ipaddress.ip_address("10.1.200.3"))
    assert allow.allows("other", ipaddress.ip_address("::1"))
    assert not allow.allows("other", ipaddress.ip_address("10.2.0.1"))


def test_redact_drops_credentials_query_and_fragment() -> None:
    assert redact("https://user:pw@example.com:8443/a.wav?token=s3cret#x") == "https://example.com:8443/a.wav"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "2130706433", "0.0.0.0"])
def test_loopback_in_any_spelling_is_refused_before_connecting(host: str) -> None:
    with hostile_server() as srv:
        port = srv.base.rsplit(":", 1)[1]
        with pytest.raises(UnsafeURL, match="refused to fetch .* address .*ECHOQ_FETCH_ALLOW_HOSTS"):
            fetch(f"http://{host}:{port}/file/a", max_bytes=1000, deadline_s=5)
        assert srv.hits == []


def test_an_allowed_host_is_fetched_and_a_redirect_from_it_to_an_internal_address_is_not() -> None:
    with hostile_server("127.0.0.2") as trusted, hostile_server("127.0.0.1") as internal:
        trusted.files["a"] = internal.files["a"] = b"RIFF-ish"
        assert fetch(trusted.url("/file/a"), max_bytes=1000, deadline_s=5, allow=TRUSTED) == b"RIFF-ish"
        hop = trusted.url("/redirect?to=" + internal.url("/file/a"))
        with pytest.raises(UnsafeURL, match="127.0.0.1, a loopback address"):
            fetch(hop, max_bytes=1000, deadline_s=5, allow=TRUSTED)
        assert internal.hits == []
        # a redirect within the trusted host is followed
        assert fetch(trusted.url("/redirect?to=/file/a"), max_bytes=1000, deadline_s=5, allow=TRUSTED) == b"RIFF-ish"


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://127.0.0.2:6379/_INFO", "ftp://example.com/a"])
def test_a_redirect_to_another_scheme_is_refused(target: str) -> None:
    with hostile_server("127.0.0.2") as srv, pytest.raises(UnsafeURL, match="redirects to a .*only http"):
        fetch(srv.url("/redirect?to=" + target), max_bytes=1000, deadline_s=5, allow=TRUSTED)


def test_a_redirect_loop_stops() -> None:
    with hostile_server("127.0.0.2") as srv, pytest.raises(UnsafeURL, match="redirected more than 5 times"):
        fetch(srv.url("/redirect"), max_bytes=1000, deadline_s=5, allow=TRUSTED)


def test_a_body_without_length_is_stopped_at_the_size_limit() -> None:
    with hostile_server("127.0.0.2") as srv, pytest.raises(AudioError, match="over the limit of 100000 bytes"):
        fetch(srv.url("/endless"), max_bytes=100_000, deadline_s=20, allow=TRUSTED)


def test_a_one_byte_per_second_body_is_refused_at_the_total_deadline() -> None:
    with hostile_server("127.0.0.2") as srv:
        t0 = time.monotonic()
        with pytest.raises(AudioError, match="longer than the deadline of 1.5 s"):
            fetch(srv.url("/slow"), max_bytes=1000, deadline_s=1.5, allow=TRUSTED)
        # The body takes 60 s; a generous bound shows the fetch did not wait for it.
        assert time.monotonic() - t0 < 30


def test_a_redirect_inward_and_a_trickling_body_are_both_refused_within_the_deadline() -> None:
    """The issue's two cases side by side, from one public-looking (allow-listed) server."""
    with hostile_server("127.0.0.2") as srv, hostile_server("127.0.0.1") as internal:
        internal.files["a"] = b"internal"
        t0 = time.monotonic()
        with pytest.raises(UnsafeURL, match="a loopback address"):
            fetch(srv.url("/redirect?to=" + internal.url("/file/a")), max_bytes=1000, deadline_s=2, allow=TRUSTED)
        with pytest.raises(AudioError, match="longer than the deadline of 2 s"):
            fetch(srv.url("/slow"), max_bytes=1000, deadline_s=2, allow=TRUSTED)
        assert internal.hits == [] and srv.hits == ["/redirect?to=" + internal.url("/file/a"), "/slow"]
        assert time.monotonic() - t0 < 30  # the slow body alone takes 60 s


def test_https_checks_the_certificate_against_the_url_host_on_the_pinned_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = self_signed(tmp_path, "127.0.0.2")
    with hostile_server("127.0.0.2", tls=tls) as srv:
        srv.files["a"] = b"over tls"
        with pytest.raises(AudioError, match="could not fetch .*SSLCertVerificationError"):
            fetch(srv.url("/file/a"), max_bytes=1000, deadline_s=10, allow=TRUSTED)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))  # trust this certificate, and only it
        assert srv.url("").startswith("https://")
        assert fetch(srv.url("/file/a"), max_bytes=1000, deadline_s=10, allow=TRUSTED) == b"over tls"
