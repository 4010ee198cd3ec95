"""Never lift bans without being told, through a real controller, the CLI and the kernel.

Each test runs its own `stockade controller run` with its own ban store and pin
root. Where a start or a reload is refused, the test checks that nothing changed:
the exit code and the one error line, the pinned maps byte for byte (bpftool), the
store file, and (by BPF_PROG_TEST_RUN of the program against the same maps) that a
banned source is still dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_harness import BAN_MAPS, Controller, config_text, one_line_error, run_stockade
from prometheus_client.parser import text_string_to_metric_families

from stockade.config import load_config
from stockade.controller import libbpf, loader
from stockade.controller.daemon import program_settings
from stockade.lab.packets import tcp4, tcp6

pytestmark = pytest.mark.kernel

XDP_DROP, XDP_PASS = 1, 2
BANS = 50
START_TIMEOUT = 120.0
_homes = itertools.count()


def v4(i: int) -> str:
    return f"198.18.{10 + i // 250}.{i % 250 + 1}"


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Controller]:
    """A controller of this test's own (not started), removed with its pins afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    pin_root = Path(f"/sys/fs/bpf/stockade-guard-{os.getpid()}-{next(_homes)}")
    controller = Controller(home, pin_root)
    try:
        yield controller
    finally:
        controller.kill()
        controller.remove_pins()


def configure(
    ctl: Controller, controller_extra: str = "", max_bans_v4: int = 1024, syn_rate: int = 200
) -> None:
    text = config_text(ctl.home, ctl.pin_root, controller_extra)
    text = text.replace("max_bans_v4 = 1024", f"max_bans_v4 = {max_bans_v4}\nsyn_rate = {syn_rate}")
    ctl.config.write_text(text)
    ctl.settings = program_settings(load_config(ctl.config))


def store_path(ctl: Controller) -> Path:
    return load_config(ctl.config).controller.ban_db


def ban_fifty(ctl: Controller) -> list[str]:
    """48 addresses with a TTL, a permanent prefix and an IPv6 address: every ban map."""
    targets = [v4(i) for i in range(BANS - 2)]
    for target in targets:
        ctl.api("ban", target=target, ttl="2h", reason="scanner")
    ctl.api("ban", target="198.18.64.0/24", reason="botnet range")
    ctl.api("ban", target="fd00:18::7", ttl="1d")
    return [*targets, "198.18.64.0/24", "fd00:18::7"]


def kernel(ctl: Controller) -> dict[str, list[dict[str, Any]]]:
    """Every ban map as bpftool dumps it: keys, expiries and hit counters."""
    return {name: ctl.dump_map(name) for name in BAN_MAPS}


def kernel_count(ctl: Controller) -> int:
    return sum(len(entries) for entries in kernel(ctl).values())


def kernel_v4(ctl: Controller) -> set[str]:
    return {".".join(map(str, e["formatted"]["key"]["addr"])) for e in ctl.dump_map("ban_v4")}


def refused_start(ctl: Controller, *args: str) -> str:
    """`stockade controller run` that must refuse: exit 1, exactly one ERROR line."""
    ctl.socket.unlink(missing_ok=True)
    result = run_stockade(
        "--config", str(ctl.config), "controller", "run", *args, timeout=START_TIMEOUT
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert not ctl.socket.exists()
    return errors[0]


def started(ctl: Controller, *args: str) -> None:
    ctl.run_args = args
    try:
        ctl.start()
    finally:
        ctl.run_args = ()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def program_on_the_same_maps(ctl: Controller) -> Iterator[loader.LoadedProgram]:
    """The XDP program, loaded in this process against the controller's pinned maps."""
    loaded = loader.load(ctl.settings)
    try:
        yield loaded
    finally:
        loaded.close()


def verdict(program: loader.LoadedProgram, frame: bytes) -> int:
    return libbpf.prog_test_run(program.fd, frame).retval


def remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


# -- a missing or empty store ---------------------------------------------------------
def test_a_deleted_store_is_refused_then_rebuilt_from_the_maps(ctl: Controller) -> None:
    configure(ctl)
    ctl.start()
    targets = ban_fifty(ctl)
    expected = {b["target"]: b for b in ctl.ok_json("bans")}
    assert ctl.stop() == 0
    store = store_path(ctl)
    remove_store(store)
    before = kernel(ctl)
    assert sum(len(e) for e in before.values()) == BANS

    line = refused_start(ctl)
    assert (
        f"the ban store {store} does not exist but the kernel maps in {ctl.pin_dir} hold " in line
    )
    assert "hold 50 bans: starting would lift them all; nothing was changed" in line
    assert "--rebuild-store-from-maps" in line and "--accept-ban-loss" in line
    assert kernel(ctl) == before  # keys, expiries and counters
    assert not store.exists()  # nothing was created in its place
    with program_on_the_same_maps(ctl) as program:
        assert verdict(program, tcp4(v4(7))) == XDP_DROP
        assert verdict(program, tcp4("198.18.64.9")) == XDP_DROP  # the prefix
        assert verdict(program, tcp6("fd00:18::7")) == XDP_DROP
        assert verdict(program, tcp4("198.18.99.1")) == XDP_PASS

    started(ctl, "--rebuild-store-from-maps")
    rebuilt = {b["target"]: b for b in ctl.ok_json("bans")}
    assert set(rebuilt) == set(targets)
    for target, ban in rebuilt.items():
        assert (ban["reason"], ban["source"], ban["in_kernel"]) == (
            "rebuilt-from-kernel",
            "kernel",
            True,
        )
        if expected[target]["expires"] is None:
            assert ban["expires"] is None
        else:  # the kernel's monotonic expiry, back in wall-clock time
            assert ban["expires"] == pytest.approx(expected[target]["expires"], abs=2)
    explained = ctl.ok_json("explain", v4(7))
    assert explained["verdict"] == "banned"
    assert explained["bans"][0]["details"]["rebuilt_from_kernel"]["expires_ns"] > 0
    assert [(e["action"], e["source"]) for e in explained["history"]] == [("ban", "kernel")]
    assert "50 bans from the kernel maps added to" in ctl.log.read_text()

    # one start only: the next plain start finds a good store and the same bans
    assert ctl.stop() == 0
    ctl.start()
    assert {b["target"] for b in ctl.ok_json("bans")} == set(targets)
    assert kernel_count(ctl) == BANS


def test_an_emptied_store_is_refused_and_accept_ban_loss_lifts_them(ctl: Controller) -> None:
    configure(ctl)
    ctl.start()
    ban_fifty(ctl)
    assert ctl.stop() == 0
    store = store_path(ctl)
    with sqlite3.connect(store) as db:
        db.execute("DELETE FROM bans")
    before, stored = kernel(ctl), digest(store)

    line = refused_start(ctl)
    assert f"the ban store {store} holds no active ban but the kernel maps" in line
    assert kernel(ctl) == before
    assert digest(store) == stored

    started(ctl, "--accept-ban-loss")
    assert ctl.ok_json("bans") == []
    assert kernel_count(ctl) == 0
    assert "0 added, 0 updated, 50 removed" in ctl.log.read_text()
    assert ctl.stop() == 0
    with program_on_the_same_maps(ctl) as program:
        assert verdict(program, tcp4(v4(7))) == XDP_PASS


@pytest.mark.parametrize(
    ("damage", "option"),
    [("truncated", "--rebuild-store-from-maps"), ("not-sqlite", "--accept-ban-loss")],
)
def test_a_damaged_store_is_refused_kept_and_set_aside(
    ctl: Controller, damage: str, option: str
) -> None:
    configure(ctl)
    ctl.start()
    targets = ban_fifty(ctl)
    assert ctl.stop() == 0  # closes the store: everything is in bans.db itself
    store = store_path(ctl)
    content = store.read_bytes()
    if damage == "truncated":
        content = content[: len(content) // 2]
    else:
        content = b"these are not the bans you are looking for\n" * 200
    store.write_bytes(content)
    before = kernel(ctl)

    line = refused_start(ctl)
    assert f"the ban store {store} is damaged (" in line
    assert "hold 50 bans; nothing was changed;" in line
    assert "either option keeps the damaged file, renamed" in line
    assert store.read_bytes() == content
    assert kernel(ctl) == before

    started(ctl, option)
    kept = list(store.parent.glob("bans.db.damaged-*"))
    (aside,) = [p for p in kept if not p.name.endswith(("-wal", "-shm"))]
    assert re.fullmatch(r"bans\.db\.damaged-\d{8}T\d{6}Z", aside.name)
    assert aside.read_bytes() == content  # renamed, never deleted or rewritten
    assert f"is kept as {aside}" in ctl.log.read_text()
    listed = {b["target"] for b in ctl.ok_json("bans")}
    if option == "--rebuild-store-from-maps":
        assert listed == set(targets)
        assert kernel_count(ctl) == BANS
    else:
        assert listed == set()
        assert kernel_count(ctl) == 0


# -- lifting more than the share at once ----------------------------------------------------
def test_lifting_more_than_the_share_is_refused_on_reload_and_at_start(ctl: Controller) -> None:
    configure(ctl)
    ctl.start()
    targets = [v4(i) for i in range(40)]
    for target in targets:
        ctl.api("ban", target=target)
    store = store_path(ctl)
    with sqlite3.connect(store, timeout=10) as db:  # the store loses 30 while we run
        db.executemany("DELETE FROM bans WHERE target = ?", [(t,) for t in targets[10:]])
    before = kernel(ctl)
    # a reload whose config changes something else too: none of it may apply
    configure(ctl, syn_rate=77)

    result = ctl.cli("reload")
    assert result.returncode == 1, result
    line = one_line_error(result)
    assert "reconciling would lift 30 of the 40 bans in the kernel" in line
    assert "nothing was changed" in line and "--rebuild-store-from-maps" in line
    assert kernel(ctl) == before
    assert ctl.ok_json("status")["syn_rate"]["rate"] == 200  # the running config stays
    assert "reload refused, the running config stays" in ctl.log.read_text()

    assert ctl.stop() == 0
    line = refused_start(ctl)
    assert "reconciling would lift 30 of the 40 bans in the kernel" in line
    assert "controller.reconcile_max_removal_share" in line
    assert kernel(ctl) == before

    # the operator says so in the config: the share applies to this start
    configure(ctl, controller_extra="reconcile_max_removal_share = 1.0")
    ctl.start()
    assert kernel_v4(ctl) == set(targets[:10])


def test_a_reload_within_the_share_applies(ctl: Controller) -> None:
    configure(ctl)
    ctl.start()
    for i in range(40):
        ctl.api("ban", target=v4(i))
    with sqlite3.connect(store_path(ctl), timeout=10) as db:
        db.executemany("DELETE FROM bans WHERE target = ?", [(v4(i),) for i in range(5)])
    assert ctl.cli("reload").returncode == 0  # 5 of 40: within the allowance
    assert kernel_v4(ctl) == {v4(i) for i in range(5, 40)}


# -- bans that do not fit -------------------------------------------------------------------
def scrape(ctl: Controller) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    where = ctl.api("status")["metrics"]
    url = f"http://{where['address']}:{where['port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.2)  # polling the sweep (every 1 s), not waiting out a window


def test_bans_that_do_not_fit_show_everywhere_until_they_fit(ctl: Controller) -> None:
    configure(ctl)
    ctl.start()
    targets = [v4(i) for i in range(20)]
    for target in targets:
        ctl.api("ban", target=target, ttl="1h")
    assert ctl.stop() == 0
    ctl.remove_pins()  # the maps are recreated smaller than the store
    configure(ctl, max_bans_v4=8)
    ctl.start()
    assert "20 added" not in ctl.log.read_text()
    assert "12 bans are in the store but NOT in the kernel" in ctl.log.read_text()

    in_kernel = kernel_v4(ctl)
    assert len(in_kernel) == 8
    listed = {b["target"]: b["in_kernel"] for b in ctl.ok_json("bans")}
    assert listed == {t: t in in_kernel for t in targets}  # the flag is the kernel's truth
    missing = sorted(set(targets) - in_kernel)

    status = ctl.cli("status", "--json")
    assert status.returncode == 3, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["bans"]["total"], shown["bans"]["not_in_kernel"]) == (20, 12)
    assert shown["maps"]["ban_v4"] == {"entries": 8, "max_entries": 8}
    assert shown["maps"]["allow_v4"] == {"entries": 1, "max_entries": 256}
    plain = ctl.cli("status")
    assert plain.returncode == 3
    assert "12 NOT IN THE KERNEL: their packets pass" in plain.stdout
    assert "ban_v4 8/8 FULL" in plain.stdout

    table = ctl.cli("bans")
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["TARGET", "EXPIRES", "KERNEL"]
    kernel_column = {row.split()[0]: row.split()[3] for row in rows if row.startswith("198.")}
    assert kernel_column == {t: "yes" if t in in_kernel else "NO" for t in targets}
    assert "12 of these bans are NOT in the kernel" in table.stdout

    explained = ctl.ok_json("explain", missing[0])
    assert explained["verdict"] == "not_in_kernel"
    assert [b["in_kernel"] for b in explained["bans"]] == [False]
    plain_explain = ctl.cli("explain", missing[0]).stdout
    assert plain_explain.startswith(f"{missing[0]}: NOT ENFORCED:")
    assert "NOT IN THE KERNEL" in plain_explain

    values = scrape(ctl)
    assert values[("stockade_bans_not_in_kernel", ())] == 12
    assert values[("stockade_map_entries", (("map", "ban_v4"),))] == 8
    assert values[("stockade_map_max_entries", (("map", "ban_v4"),))] == 8
    assert values[("stockade_map_fill_ratio", (("map", "ban_v4"),))] == 1.0

    # room appears: the sweep puts waiting bans in, and everything says so
    for target in sorted(in_kernel)[:3]:
        ctl.api("unban", target=target)
    wait_for(lambda: ctl.api("status")["bans"]["not_in_kernel"] == 9)
    now_in = kernel_v4(ctl)
    assert len(now_in) == 8 and len(now_in - in_kernel) == 3
    assert {b["target"] for b in ctl.ok_json("bans") if b["in_kernel"]} == now_in
    assert scrape(ctl)[("stockade_bans_not_in_kernel", ())] == 9
    for ban in ctl.ok_json("bans"):
        if not ban["in_kernel"]:
            ctl.api("unban", target=ban["target"])
    wait_for(lambda: ctl.api("status")["bans"]["not_in_kernel"] == 0)
    assert ctl.cli("status").returncode == 0
    assert all(b["in_kernel"] for b in ctl.ok_json("bans"))


def test_the_two_options_exclude_each_other(ctl: Controller) -> None:
    configure(ctl)
    result = run_stockade(
        "--config",
        str(ctl.config),
        "controller",
        "run",
        "--rebuild-store-from-maps",
        "--accept-ban-loss",
    )
    assert result.returncode == 2
    assert "exclude each other" in one_line_error(result)
    assert not store_path(ctl).exists()
