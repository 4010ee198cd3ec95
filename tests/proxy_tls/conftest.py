"""Fixtures for the TLS tests: one test CA, RSA leaves for two names and a wildcard."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from tls_harness import client_context, write_pair

from stockade.proxy.settings import Certificate

# Listed in this order in ServerTls, so "api" is the default certificate.
NAMES = {"api": "api.example.test", "www": "www.example.test", "apps": "*.apps.example.test"}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def leaves(ca: trustme.CA) -> dict[str, trustme.LeafCert]:
    # RSA leaves, so that ECDHE-RSA suites are the ones a weak-suite client would meet:
    # against an ECDSA certificate, RSA key exchange fails for a reason unrelated to policy.
    return {stem: ca.issue_cert(name, key_type=trustme.KeyType.RSA) for stem, name in NAMES.items()}


@pytest.fixture
def certs(leaves: dict[str, trustme.LeafCert], tmp_path: Path) -> dict[str, Certificate]:
    return {stem: write_pair(leaf, tmp_path, stem) for stem, leaf in leaves.items()}


@pytest.fixture
def client(ca: trustme.CA) -> ssl.SSLContext:
    return client_context(ca)
