"""Handshakes against ServerTls.context: SNI selection, protocol and cipher policy, ALPN."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tls_harness import (
    Served,
    get,
    handshake_error,
    hello_app,
    legacy_context,
    peer_names,
    tls_connect,
    write_cn_only,
    write_pair,
)

from stockade.proxy.settings import Certificate
from stockade.proxy.tls import ServerTls


@pytest.fixture
def tls(certs: dict[str, Certificate]) -> ServerTls:
    return ServerTls([certs["api"], certs["www"], certs["apps"]])


@pytest.fixture
def server(tls: ServerTls) -> Iterator[Served]:
    with Served(hello_app(), tls.context) as served:
        yield served


@pytest.mark.parametrize(
    ("server_name", "presented"),
    [
        ("api.example.test", "api.example.test"),
        ("www.example.test", "www.example.test"),
        ("WWW.Example.TEST", "www.example.test"),
        ("x.apps.example.test", "*.apps.example.test"),
        ("a.b.apps.example.test", "api.example.test"),  # "*" covers one label: default
        ("apps.example.test", "api.example.test"),  # nor the bare parent: default
        ("unknown.test", "api.example.test"),
        (None, "api.example.test"),  # no SNI at all
    ],
)
def test_sni_selects_the_certificate(
    server: Served, client: ssl.SSLContext, server_name: str | None, presented: str
) -> None:
    with tls_connect(server.port, client, server_name) as conn:
        assert peer_names(conn) == [presented]
        assert get(conn, server_name or "127.0.0.1") == (200, b"hello")


def test_names_for_status(tls: ServerTls, certs: dict[str, Certificate]) -> None:
    assert tls.names() == {
        "api.example.test": certs["api"].cert,
        "www.example.test": certs["www"].cert,
        "*.apps.example.test": certs["apps"].cert,
    }


def test_common_name_is_the_fallback_without_san(tmp_path: Path) -> None:
    pair = write_cn_only(tmp_path, "Legacy.Example.Test")
    assert ServerTls([pair]).names() == {"legacy.example.test": pair.cert}


def test_first_certificate_wins_a_shared_name(
    ca: trustme.CA, certs: dict[str, Certificate], tmp_path: Path
) -> None:
    other = write_pair(ca.issue_cert("www.example.test", "extra.example.test"), tmp_path, "o")
    tls = ServerTls([certs["www"], other])
    assert tls.names() == {"www.example.test": certs["www"].cert, "extra.example.test": other.cert}


def test_context_settings(tls: ServerTls) -> None:
    context = tls.context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_RENEGOTIATION):
        assert context.options & option
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert (cipher["kea"], cipher["aead"]) == ("kx-ecdhe", True), cipher["name"]


@pytest.mark.parametrize(
    "ciphers",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
)
def test_modern_tls12_suites_are_accepted(
    server: Served, client: ssl.SSLContext, ciphers: str
) -> None:
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(ciphers)
    with tls_connect(server.port, client, "api.example.test") as conn:
        assert conn.version() == "TLSv1.2"
        assert conn.cipher()[0] == ciphers  # type: ignore[index]


def test_tls13_is_accepted(server: Served, client: ssl.SSLContext) -> None:
    with tls_connect(server.port, client, "api.example.test") as conn:
        assert conn.version() == "TLSv1.3"


LEGACY = [
    pytest.param(ssl.TLSVersion.TLSv1_1, "DEFAULT", "TLSV1_ALERT_PROTOCOL_VERSION", id="tls1.1"),
    pytest.param(ssl.TLSVersion.TLSv1, "DEFAULT", "TLSV1_ALERT_PROTOCOL_VERSION", id="tls1.0"),
    pytest.param(
        ssl.TLSVersion.TLSv1_2,
        "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        id="tls1.2-cbc-only",
    ),
    pytest.param(
        ssl.TLSVersion.TLSv1_2,
        "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        id="tls1.2-rsa-key-exchange-only",
    ),
]


@pytest.mark.parametrize(("maximum", "ciphers", "alert"), LEGACY)
def test_legacy_clients_are_refused(
    server: Served, certs: dict[str, Certificate], maximum: ssl.TLSVersion, ciphers: str, alert: str
) -> None:
    legacy_client = legacy_context(maximum, ciphers, server=False)

    # Control: a permissive server completes the handshake with this very client.
    permissive = legacy_context(ssl.TLSVersion.TLSv1_3, "ALL", server=True)
    permissive.load_cert_chain(certs["api"].cert, certs["api"].key)
    with Served(hello_app(), permissive) as control:
        with tls_connect(control.port, legacy_client, "api.example.test") as conn:
            assert get(conn, "api.example.test") == (200, b"hello")

    # The gateway refuses it. OpenSSL queues the alert, but asyncio (3.11) closes the
    # transport on a failed handshake without flushing it, so the client may see a bare EOF.
    with pytest.raises(ssl.SSLError) as refused:
        with tls_connect(server.port, legacy_client, "api.example.test"):
            pass
    closed = isinstance(refused.value, ssl.SSLZeroReturnError | ssl.SSLEOFError)
    assert closed or refused.value.reason == alert, refused.value


@pytest.mark.parametrize(("maximum", "ciphers", "alert"), LEGACY)
def test_refusals_carry_the_right_alert(
    tls: ServerTls, maximum: ssl.TLSVersion, ciphers: str, alert: str
) -> None:
    legacy_client = legacy_context(maximum, ciphers, server=False)
    error = handshake_error(tls.context, legacy_client, "api.example.test")
    assert error is not None
    assert error.reason == alert


@pytest.mark.parametrize(
    ("offered", "selected"),
    [(["h2", "http/1.1"], "http/1.1"), (["http/1.1"], "http/1.1"), (["h2"], None)],
)
def test_alpn_is_http11_only(
    server: Served, client: ssl.SSLContext, offered: list[str], selected: str | None
) -> None:
    client.set_alpn_protocols(offered)
    with tls_connect(server.port, client, "api.example.test") as conn:
        assert conn.selected_alpn_protocol() == selected
