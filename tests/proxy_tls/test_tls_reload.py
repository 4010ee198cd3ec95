"""ServerTls.reload(): new handshakes get the new files, open connections carry on."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from tls_harness import Served, get, hello_app, peer_names, peer_serial, tls_connect, write_pair

from stockade.proxy.settings import Certificate
from stockade.proxy.tls import ServerTls, TlsConfigError


def test_reload_swaps_certificates_and_keeps_open_connections(
    ca: trustme.CA, certs: dict[str, Certificate], client: ssl.SSLContext, tmp_path: Path
) -> None:
    tls = ServerTls([certs["api"], certs["www"]])
    context = tls.context
    with Served(hello_app(), context) as server:
        with tls_connect(server.port, client, "api.example.test") as old:
            assert get(old, "api.example.test") == (200, b"hello")
            old_serial = peer_serial(old)

            renewed = ca.issue_cert("api.example.test", "new.example.test")  # ECDSA this time
            write_pair(renewed, tmp_path, "api")  # over the same files
            server.in_loop(tls.reload)  # as the worker's SIGHUP handler does

            # The established connection keeps its session and keeps serving requests.
            assert get(old, "api.example.test") == (200, b"hello")
            assert peer_serial(old) == old_serial

            with tls_connect(server.port, client, "api.example.test") as new:
                assert peer_serial(new) != old_serial
                assert get(new, "api.example.test") == (200, b"hello")
            with tls_connect(server.port, client, "new.example.test") as new:
                assert peer_names(new) == ["api.example.test", "new.example.test"]

            assert get(old, "api.example.test") == (200, b"hello")

    assert tls.context is context
    assert tls.names() == {
        "api.example.test": certs["api"].cert,
        "new.example.test": certs["api"].cert,
        "www.example.test": certs["www"].cert,
    }


def test_failed_reload_keeps_all_old_certificates(
    ca: trustme.CA, certs: dict[str, Certificate], client: ssl.SSLContext, tmp_path: Path
) -> None:
    tls = ServerTls([certs["api"], certs["www"]])
    names = tls.names()
    with Served(hello_app(), tls.context) as server:
        with tls_connect(server.port, client, "api.example.test") as conn:
            old_serial = peer_serial(conn)

        # The first pair is renewed correctly, the second is broken: nothing is swapped,
        # not even the first, so the listener never serves a half-applied set.
        write_pair(ca.issue_cert("api.example.test"), tmp_path, "api")
        certs["www"].key.write_bytes(certs["api"].key.read_bytes())
        with pytest.raises(TlsConfigError, match="does not match certificate"):
            server.in_loop(tls.reload)

        with tls_connect(server.port, client, "api.example.test") as conn:
            assert peer_serial(conn) == old_serial
            assert get(conn, "api.example.test") == (200, b"hello")
        with tls_connect(server.port, client, "www.example.test") as conn:
            assert peer_names(conn) == ["www.example.test"]
    assert tls.names() == names


def test_reload_after_a_fix_succeeds(
    leaves: dict[str, trustme.LeafCert], certs: dict[str, Certificate], tmp_path: Path
) -> None:
    tls = ServerTls([certs["api"]])
    certs["api"].cert.unlink()
    with pytest.raises(TlsConfigError, match="file not found"):
        tls.reload()
    write_pair(leaves["api"], tmp_path, "api")
    tls.reload()
    assert tls.names() == {"api.example.test": certs["api"].cert}
