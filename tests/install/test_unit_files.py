"""The shipped units and the shipped config agree with each other and with the design.

The installed config's paths must lie in the directories systemd makes
writable for each unit (ProtectSystem=strict makes everything else
read-only), and each unit keeps exactly the capabilities docs/install.md
explains.
"""

from __future__ import annotations

import grp
from pathlib import Path, PurePosixPath

import pytest
from install_harness import REPO, SOURCE_UNITS, capability_names, unit_value, unit_words

from stockade.config import Config, load_config

CONTROLLER = SOURCE_UNITS / "stockade-controller.service"
PROXY = SOURCE_UNITS / "stockade-proxy.service"
PACKAGED_CONFIG = REPO / "packaging" / "stockade.toml"


@pytest.fixture
def packaged(monkeypatch: pytest.MonkeyPatch) -> Config:
    """The installed default config, read as on a host where `stockade` exists."""
    real = grp.getgrnam

    def getgrnam(name: str) -> grp.struct_group:
        if name == "stockade":
            return grp.struct_group(("stockade", "x", 64999, []))
        return real(name)

    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    return load_config(PACKAGED_CONFIG)


def inside(path: Path, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


def test_packaged_config_is_safe(packaged: Config) -> None:
    assert packaged.xdp.interfaces == ()  # nothing filtered until the operator says where
    assert packaged.xdp.monitor is False
    assert [(li.address, li.port) for li in packaged.proxy.listeners] == [("127.0.0.1", 8080)]
    assert packaged.proxy.routes == ()
    assert packaged.proxy.user is None  # the unit runs the proxy as `stockade` already
    assert packaged.controller.rules_group == "stockade"


def test_controller_paths_are_its_unit_directories(packaged: Config) -> None:
    ctl = packaged.controller
    runtime = "/run/" + unit_value(CONTROLLER, "RuntimeDirectory")
    state = "/var/lib/" + unit_value(CONTROLLER, "StateDirectory")
    assert inside(ctl.socket, runtime) and inside(ctl.rules_socket, runtime)
    assert ctl.state_dir == Path(state)
    assert unit_value(CONTROLLER, "StateDirectoryMode") == "0700"
    assert inside(ctl.pin_root, unit_value(CONTROLLER, "ReadWritePaths"))
    # the controller may chgrp the rules socket to this group without CAP_CHOWN
    assert unit_value(CONTROLLER, "SupplementaryGroups") == ctl.rules_group


def test_proxy_paths_are_its_unit_directories(packaged: Config) -> None:
    proxy = packaged.proxy
    runtime = "/run/" + unit_value(PROXY, "RuntimeDirectory")
    state = "/var/lib/" + unit_value(PROXY, "StateDirectory")
    # the proxy empties and re-creates these: their parent must be its own
    assert proxy.status_dir.parent == Path(runtime)
    assert proxy.metrics_dir.parent == Path(runtime)
    assert inside(proxy.quotas.database, state)
    assert proxy.access_log == "-"  # the journal


def test_controller_capabilities() -> None:
    assert capability_names(CONTROLLER, "CapabilityBoundingSet") == [
        "bpf",
        "net_admin",
        "perfmon",
        "sys_admin",
    ]
    assert unit_words(CONTROLLER, "AmbientCapabilities") == set()
    assert unit_words(CONTROLLER, "User") == set()  # root, bounded by the set above


def test_proxy_is_unprivileged_but_for_low_ports() -> None:
    assert unit_value(PROXY, "User") == "stockade"
    assert unit_value(PROXY, "Group") == "stockade"
    assert capability_names(PROXY, "AmbientCapabilities") == ["net_bind_service"]
    assert capability_names(PROXY, "CapabilityBoundingSet") == ["net_bind_service"]


@pytest.mark.parametrize("unit", [CONTROLLER, PROXY], ids=lambda p: p.name)
def test_common_service_settings(unit: Path) -> None:
    assert unit_value(unit, "Restart") == "on-failure"
    assert unit_value(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value(unit, "WantedBy") == "multi-user.target"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectControlGroups": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectClock": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
    }.items():
        assert unit_value(unit, key) == value, key
    assert "@system-service" in unit_words(unit, "SystemCallFilter")


def test_controller_keeps_bpffs_writable_and_the_rest_of_sys_read_only() -> None:
    # ProtectKernelTunables= would leave /sys/fs/bpf read-only on systemd 252
    # whatever ReadWritePaths= says; ProtectKernelModules= hides the kernel
    # headers bcc compiles against.
    assert unit_words(CONTROLLER, "ProtectKernelTunables") == set()
    assert unit_words(CONTROLLER, "ProtectKernelModules") == set()
    assert {"/sys", "/proc/sys"} <= unit_words(CONTROLLER, "ReadOnlyPaths")
    assert unit_value(CONTROLLER, "ReadWritePaths") == "/sys/fs/bpf"
    assert unit_value(CONTROLLER, "AssertPathIsMountPoint") == "/sys/fs/bpf"
    # no mount(2): a bpffs mounted in the unit's own namespace would vanish with it
    assert not unit_words(CONTROLLER, "SystemCallFilter") & {"@mount", "mount"}
    assert {"AF_NETLINK", "AF_UNIX"} <= unit_words(CONTROLLER, "RestrictAddressFamilies")


def test_proxy_has_the_kernel_protections_too() -> None:
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "RestrictNamespaces"):
        assert unit_value(PROXY, key) == "yes", key
    assert unit_words(PROXY, "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # SIGTERM to the master only: it drains the workers itself
    assert unit_value(PROXY, "KillMode") == "mixed"
