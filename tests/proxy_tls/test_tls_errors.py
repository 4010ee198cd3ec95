"""Certificates that cannot be served give a one-line TlsConfigError naming the file."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from tls_harness import write_pair

from stockade.proxy.settings import Certificate
from stockade.proxy.tls import ServerTls, TlsConfigError

Case = Callable[[dict[str, Certificate], Path], tuple[Certificate, str]]


def _missing_cert(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    path = tmp / "missing.pem"
    return Certificate(path, certs["api"].key), f"certificate {path}: file not found"


def _missing_key(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    path = tmp / "missing.key"
    return Certificate(certs["api"].cert, path), f"private key {path}: file not found"


def _directory(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    # Tests run as root, and root reads a chmod 000 file; a directory is a path that even
    # root cannot read as a file. The real permission case is test_unreadable_key_as_nobody.
    return Certificate(tmp, certs["api"].key), f"certificate {tmp}: is a directory"


def _garbage_cert(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    path = tmp / "garbage.pem"
    path.write_bytes(b"this is not a certificate\n")
    return Certificate(path, certs["api"].key), f"certificate {path}: not a PEM certificate"


def _key_as_cert(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    key = certs["api"].key  # PEM, but a key
    return Certificate(key, key), f"certificate {key}: not a PEM certificate"


def _garbage_key(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    path = tmp / "garbage.key"
    path.write_bytes(b"\x00\x01binary")
    return Certificate(certs["api"].cert, path), f"private key {path}: not a PEM private key"


def _cert_as_key(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    cert = certs["api"].cert
    return Certificate(cert, cert), f"private key {cert}: not a PEM private key"


def _mismatched(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    cert, key = certs["api"].cert, certs["www"].key
    return Certificate(cert, key), f"private key {key}: does not match certificate {cert}"


def _encrypted(certs: dict[str, Certificate], tmp: Path) -> tuple[Certificate, str]:
    key = serialization.load_pem_private_key(certs["api"].key.read_bytes(), password=None)
    path = tmp / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return Certificate(certs["api"].cert, path), f"private key {path}: encrypted with a passphrase"


CASES = [
    _missing_cert,
    _missing_key,
    _directory,
    _garbage_cert,
    _key_as_cert,
    _garbage_key,
    _cert_as_key,
    _mismatched,
    _encrypted,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_pair_is_refused_with_a_clear_message(
    certs: dict[str, Certificate], tmp_path: Path, case: Case
) -> None:
    bad, message = case(certs, tmp_path)
    with pytest.raises(TlsConfigError) as refused:
        ServerTls([certs["www"], bad])  # any certificate of the list, not only the first
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_no_certificates() -> None:
    with pytest.raises(TlsConfigError, match=r"^no certificates"):
        ServerTls([])


def test_unreadable_key_as_nobody(certs: dict[str, Certificate]) -> None:
    """A worker that dropped privileges must still read the key on reload; say so if it cannot.

    Root reads any file, so a forked child drops to nobody (65534) before loading a 0600 key
    owned by root, from a directory nobody may enter.
    """
    directory = Path(tempfile.mkdtemp(prefix="stockade-tls-"))
    try:
        directory.chmod(0o755)
        cert = Path(shutil.copy(certs["api"].cert, directory / "api.pem"))
        key = Path(shutil.copy(certs["api"].key, directory / "api.key"))
        cert.chmod(0o644)
        key.chmod(0o600)
        message = _in_child_as_nobody(Certificate(cert, key))
    finally:
        shutil.rmtree(directory)
    assert message.startswith(f"private key {key}: permission denied; the proxy's user")


def _in_child_as_nobody(pair: Certificate) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                ServerTls([pair])
                result = "loaded"
            except TlsConfigError as exc:
                result = str(exc)
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_expired_certificate_is_served_with_a_warning(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    leaf = ca.issue_cert(
        "old.example.test", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    pair = write_pair(leaf, tmp_path, "old")
    with caplog.at_level(logging.WARNING, logger="stockade.proxy"):
        tls = ServerTls([pair])
    assert tls.names() == {"old.example.test": pair.cert}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"certificate {pair.cert} expired on ")
    assert warnings[0].endswith("; renew it")


def test_not_yet_valid_certificate_warns(
    certs: dict[str, Certificate], caplog: pytest.LogCaptureFixture
) -> None:
    long_ago = datetime(1990, 1, 1, tzinfo=UTC)  # trustme: valid from 2000
    with caplog.at_level(logging.WARNING, logger="stockade.proxy"):
        ServerTls([certs["api"]], clock=lambda: long_ago)
    assert any(
        r.getMessage().startswith(f"certificate {certs['api'].cert} is not valid before")
        for r in caplog.records
    )
