"""Attaching through netlink: native/generic fallback, compare-and-swap, detach.

A bridge has no native XDP support, which makes the fallback observable; a
veth pair supports both modes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from stockade.controller import loader, xdp_attach
from stockade.controller.xdp_attach import AttachError, Mode

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

NS = f"sta{os.getpid() % 100000:05d}"


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    netns.create(NS)
    try:
        with NetNS(NS) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("add", ifname="v0", kind="veth", peer="v1")
            for name in ("br0", "v0", "v1"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        yield NS
    finally:
        netns.remove(NS)


@pytest.fixture(scope="module")
def settings() -> Iterator[loader.ProgramSettings]:
    root = Path(f"/sys/fs/bpf/stockade-attach-{os.getpid()}")
    settings = loader.ProgramSettings(pin_root=root, max_bans_v4=64, max_bans_v6=64)
    try:
        yield settings
    finally:
        loader.remove_pins(settings)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def programs(settings: loader.ProgramSettings) -> Iterator[list[loader.LoadedProgram]]:
    loaded = [loader.load(settings), loader.load(settings)]
    yield loaded
    for program in loaded:
        program.close()


def test_auto_falls_back_to_generic_with_a_warning(
    ns: str, programs: list[loader.LoadedProgram], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        state = xdp_attach.attach("br0", programs[0].fd, Mode.AUTO, ns)
    try:
        assert state.mode == "generic" and state.prog_id == programs[0].prog_id
        assert any("falling back to generic" in r.getMessage() for r in caplog.records)
    finally:
        xdp_attach.detach("br0", ns)


def test_forced_native_fails_clearly_where_unsupported(
    ns: str, programs: list[loader.LoadedProgram]
) -> None:
    with pytest.raises(AttachError, match="cannot attach XDP to br0"):
        xdp_attach.attach("br0", programs[0].fd, Mode.NATIVE, ns)
    assert xdp_attach.query("br0", ns).prog_id == 0


def test_replace_is_a_compare_and_swap(ns: str, programs: list[loader.LoadedProgram]) -> None:
    first, second = programs
    assert xdp_attach.attach("v0", first.fd, Mode.NATIVE, ns).prog_id == first.prog_id
    try:
        # expecting the wrong program: refused, and the running one stays
        with pytest.raises(AttachError, match="cannot replace"):
            xdp_attach.replace("v0", second.fd, second.prog_id, Mode.NATIVE, ns)
        assert xdp_attach.query("v0", ns).prog_id == first.prog_id
        # attaching again swaps atomically and keeps the mode
        state = xdp_attach.attach("v0", second.fd, Mode.AUTO, ns)
        assert (state.prog_id, state.mode) == (second.prog_id, "native")
        # switching modes would need a detach (a window): refused
        with pytest.raises(AttachError, match="switching to generic"):
            xdp_attach.attach("v0", first.fd, Mode.GENERIC, ns)
    finally:
        assert xdp_attach.detach("v0", ns).prog_id == 0


def test_unknown_interface_names_the_namespace(
    ns: str, programs: list[loader.LoadedProgram]
) -> None:
    with pytest.raises(AttachError, match=f"interface nope0 not found in network namespace {ns}"):
        xdp_attach.attach("nope0", programs[0].fd, Mode.AUTO, ns)


def test_load_refuses_pinned_maps_of_another_size(settings: loader.ProgramSettings) -> None:
    bigger = loader.ProgramSettings(pin_root=settings.pin_root, max_bans_v4=128, max_bans_v6=64)
    with pytest.raises(
        loader.LoadError, match="ban_v4 holds 64 entries but the config asks for 128"
    ):
        loader.load(bigger)
