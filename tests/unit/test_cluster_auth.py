"""Cluster authentication without Redis: key files, tags, the codec of what is read from
Redis, replay memory, the refusal log, and the [cluster.auth] / [cluster.accept] config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.cluster_settings import ClusterAuth
from stockade.config import ConfigError, parse_config
from stockade.controller import metrics
from stockade.controller.cluster import embedded_status
from stockade.controller.cluster_auth import (
    BAD_TAG,
    MALFORMED,
    MAX_LOGGED_ORIGINS,
    UNKNOWN_KEY,
    KeyFileError,
    Keyring,
    NonceMemory,
    RefusalLog,
    Signed,
    key_id,
    load_key,
    load_keyring,
    sign,
    verify,
)
from stockade.controller.cluster_records import (
    Change,
    MalformedChange,
    change_from_entry,
    change_from_value,
)

SECRET = "0123456789abcdef" * 4  # 64 bytes of text, as `openssl rand -hex 32` writes


def key_file(path: Path, text: str = SECRET, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


# -- key files ------------------------------------------------------------------------


def test_a_private_key_file_is_read(tmp_path: Path) -> None:
    key = load_key(key_file(tmp_path / "k"), "cluster.auth.key_file")
    assert key.secret == SECRET.encode() and key.kid == key_id(SECRET.encode())
    assert SECRET not in repr(key)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_a_key_file_group_or_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path / "k", mode=mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600") as info:
        load_key(path, "cluster.auth.key_file")
    assert SECRET not in str(info.value)


def test_other_unusable_key_files_are_refused_and_the_key_never_shown(tmp_path: Path) -> None:
    cases: list[tuple[Path, str]] = []
    link = tmp_path / "link"
    link.symlink_to(key_file(tmp_path / "real"))
    cases.append((link, "symlink is refused"))
    cases.append((key_file(tmp_path / "short", "too-short"), "at least 32"))
    cases.append((key_file(tmp_path / "huge", "x" * 5000), "over 4096 bytes"))
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    cases.append((directory, "not a regular file"))
    cases.append((tmp_path / "missing", "cannot open"))
    owned = key_file(tmp_path / "owned")
    os.chown(owned, 54321, -1)
    cases.append((owned, "belongs to uid 54321"))
    for path, message in cases:
        with pytest.raises(KeyFileError, match=message) as info:
            load_key(path, "cluster.auth.key_file")
        assert str(info.value).startswith("cluster.auth.key_file: ")
        assert SECRET not in str(info.value) and "x" * 40 not in str(info.value)


def test_the_keyring_signs_with_one_key_and_accepts_the_others(tmp_path: Path) -> None:
    current = key_file(tmp_path / "new", "n" * 40)
    previous = key_file(tmp_path / "old", "o" * 40)
    ring = load_keyring(ClusterAuth(key_file=current, accept_key_files=(previous,)))
    assert ring.signing is not None and ring.signing.secret == b"n" * 40
    assert set(ring.accepted) == {key_id(b"n" * 40), key_id(b"o" * 40)}
    assert load_keyring(ClusterAuth(insecure_unauthenticated=True)) == Keyring(None, {})


# -- tags -----------------------------------------------------------------------------

texts = st.text(max_size=40)
changes = st.builds(Signed, texts, texts, texts, texts, texts, texts, texts)
FIELDS = [f.name for f in dataclasses.fields(Signed)]


def ring_of(secret: bytes) -> Keyring:
    key = load_key_from(secret)
    return Keyring(key, {key.kid: key})


def load_key_from(secret: bytes) -> Any:
    from stockade.controller.cluster_auth import ClusterKey

    return ClusterKey(key_id(secret), secret)


RING = ring_of(b"k" * 32)
KEY = RING.signing


@given(changes)
def test_a_signature_verifies_only_with_the_key_that_made_it(signed: Signed) -> None:
    assert KEY is not None
    signature = sign(KEY, signed)
    assert verify(RING, signed, signature) is None
    assert verify(ring_of(b"z" * 32), signed, signature) == UNKNOWN_KEY


@given(changes, st.sampled_from(FIELDS), texts)
def test_changing_any_field_breaks_the_tag(signed: Signed, field: str, value: str) -> None:
    assert KEY is not None
    signature = sign(KEY, signed)
    changed = dataclasses.replace(signed, **{field: value})
    expected = None if changed == signed else BAD_TAG
    assert verify(RING, changed, signature) == expected


@given(changes, changes)
def test_no_two_changes_share_a_message(a: Signed, b: Signed) -> None:
    """Length-prefixed fields: moving text from one field to the next changes the message."""
    assert (a.message() == b.message()) == (a == b)


@given(changes, st.integers(0, len(FIELDS) - 2), st.integers(0, 40))
def test_moving_text_across_a_field_boundary_breaks_the_tag(
    signed: Signed, index: int, cut: int
) -> None:
    """Text moved from the end of one field to the start of the next is another change,
    whose concatenated fields are the same: the tag must still tell them apart."""
    assert KEY is not None
    values = [getattr(signed, name) for name in FIELDS]
    left = values[index]
    cut = min(cut, len(left))
    if cut == len(left):
        return  # nothing moves
    values[index], values[index + 1] = left[:cut], left[cut:] + values[index + 1]
    moved = Signed(*values)
    assert "".join(values) == "".join(getattr(signed, name) for name in FIELDS)
    assert verify(RING, moved, sign(KEY, signed)) == BAD_TAG


@pytest.mark.parametrize("signature", ["", "v1", "v1.", "v1..", "v2.abc.def", "v1.kid", "x.y.z"])
def test_a_malformed_signature_is_told_apart(signature: str) -> None:
    signed = Signed("p", "n", "ban", "t", "1", "nc", "{}")
    assert verify(RING, signed, signature) == MALFORMED


def test_a_key_id_names_a_key_without_showing_it() -> None:
    assert KEY is not None
    assert len(KEY.kid) == 16 and KEY.kid not in KEY.secret.hex()
    assert key_id(b"a" * 32) != key_id(b"b" * 32)


# -- what is read from Redis -------------------------------------------------------------

RECORD = json.dumps(
    {
        "target": "198.18.7.1",
        "reason": "r",
        "source": "cli",
        "node": "a",
        "created": 1.0,
        "expires": None,
        "rule": None,
        "details": None,
    }
)


def test_a_stored_value_reads_back_as_the_change_it_was() -> None:
    made = Change("a", "ban", "198.18.7.1", "12.5", "n0", RECORD, "v1.k.t")
    assert change_from_value(made.stored_value()) == made
    old_reader = json.loads(made.stored_value())  # a stockade before auth reads these
    assert old_reader["target"] == "198.18.7.1" and old_reader["source"] == "cli"
    unban = Change("a", "unban", "198.18.7.1", "13", "n1", "", None)
    assert change_from_value(unban.stored_value()) == unban
    legacy = change_from_value(RECORD)  # a bare record: unsigned
    assert legacy.signature is None and legacy.node == "a" and legacy.action == "ban"


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=6)
        ),
        max_leaves=20,
    )
)
def test_anything_stored_either_parses_or_is_malformed(value: Any) -> None:
    for text in (json.dumps(value), json.dumps({"envelope": value})):
        with contextlib.suppress(MalformedChange):
            change_from_value(text)


@given(st.dictionaries(st.sampled_from(["a", "t", "n", "r", "at", "nc", "sig"]), st.text()))
def test_any_stream_entry_either_parses_or_is_malformed(fields: dict[str, str]) -> None:
    try:
        made = change_from_entry(fields)
    except MalformedChange:
        return
    assert made.action in ("ban", "unban") and (made.action == "ban") == bool(made.record)


# -- replay memory and the refusal log ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_nonce_is_accepted_once_within_the_window() -> None:
    clock = FakeClock()
    memory = NonceMemory(30.0, clock)
    assert memory.first_time("n1") and not memory.first_time("n1")
    clock.now += 59
    assert not memory.first_time("n1")
    clock.now += 2  # over twice the window: the window check refuses it by then anyway
    assert memory.first_time("n1")


def test_refusals_are_logged_once_per_origin_per_minute_then_summed() -> None:
    clock = FakeClock()
    lines: list[str] = []
    refusals = RefusalLog(lines.append, clock)
    for _ in range(5):
        refusals.refused("event", "mallory", "bad_tag", "198.18.7.1: no match")
    refusals.refused("record", "eve", "unsigned", "x")
    assert len(lines) == 2 and "an event from mallory (bad_tag)" in lines[0]
    assert "a record from eve" in lines[1]
    clock.now += 59
    refusals.flush()
    assert len(lines) == 2
    clock.now += 2
    refusals.flush()
    assert lines[2] == "cluster: refused 4 more from mallory in the last 60s (bad_tag)"
    refusals.refused("event", "mallory", "replayed", "y")  # a new minute: logged again
    assert len(lines) == 4 and "(replayed)" in lines[3]


def test_invented_origins_cannot_flood_the_log() -> None:
    lines: list[str] = []
    refusals = RefusalLog(lines.append, FakeClock())
    for i in range(10 * MAX_LOGGED_ORIGINS):
        refusals.refused("event", f"node-{i}", "unsigned", "x")
    assert len(lines) == MAX_LOGGED_ORIGINS + 1
    assert "from (other origins)" in lines[-1]


# -- config -------------------------------------------------------------------------


def redis(**keys: Any) -> dict[str, Any]:
    return {"cluster": {"backend": "redis", "url": "redis://198.18.2.1:6379/0", **keys}}


def test_redis_without_a_key_is_refused_unless_explicitly_insecure() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.auth\.key_file: required.*insecure_unauth"):
        parse_config(redis())
    insecure = parse_config(redis(auth={"insecure_unauthenticated": True})).cluster.auth
    assert insecure.insecure_unauthenticated and not insecure.enabled
    assert parse_config({}).cluster.auth == ClusterAuth()  # embedded needs none


def test_auth_and_accept_with_every_key() -> None:
    config = parse_config(
        redis(
            node="edge-1",
            auth={
                "key_file": "/etc/stockade/cluster.key",
                "accept_key_files": ["/etc/stockade/cluster.key.old"],
                "nodes": ["edge-1", "edge-2"],
                "replay_window": "10s",
                "accept_unsigned": True,
            },
            accept={"bans": ["rule"], "unbans": "received"},
        )
    ).cluster
    assert config.auth.key_file == Path("/etc/stockade/cluster.key")
    assert config.auth.accept_key_files == (Path("/etc/stockade/cluster.key.old"),)
    assert config.auth.nodes == ("edge-1", "edge-2") and config.auth.replay_window == 10.0
    assert config.auth.accept_unsigned
    assert config.accept.bans == ("rule",) and config.accept.unbans == "received"
    assert (
        parse_config(redis(auth={"key_file": "/k"}, accept={"bans": []})).cluster.accept.bans == ()
    )


@pytest.mark.parametrize(
    ("auth", "accept", "message"),
    [
        ({"key_file": "/k", "insecure_unauthenticated": True}, {}, "together"),
        ({"insecure_unauthenticated": True, "accept_unsigned": True}, {}, "need a key_file"),
        ({"insecure_unauthenticated": True, "accept_key_files": ["/o"]}, {}, "need a key_file"),
        ({"key_file": "relative.key"}, {}, "absolute path"),
        ({"key_file": "/k", "accept_key_files": ["old.key"]}, {}, "absolute path"),
        ({"key_file": "/k", "nodes": ["edge-2"]}, {}, "this node .* is not in the list"),
        ({"key_file": "/k", "nodes": ["bad name"]}, {}, "not a valid node name"),
        ({"key_file": "/k", "replay_window": "500ms"}, {}, "between 1s and 1h"),
        ({"key_file": "/k", "replay_window": "2h"}, {}, "between 1s and 1h"),
        ({"key_file": "/k", "key_fiel": "/x"}, {}, "did you mean cluster.auth.key_file"),
        ({"key_file": "/k"}, {"bans": ["cluster"]}, "cluster.accept.bans: 'cluster'"),
        ({"key_file": "/k"}, {"unbans": "some"}, "cluster.accept.unbans: 'some'"),
    ],
)
def test_auth_errors_name_the_key(
    auth: dict[str, Any], accept: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(redis(node="edge-1", auth=auth, accept=accept))


# -- metrics ---------------------------------------------------------------------------


def test_refusals_are_a_metric_by_kind_and_reason() -> None:
    status = {
        **embedded_status("a"),
        "backend": "redis",
        "state": "connected",
        "refused": {"event": {"bad_tag": 3, "unsigned": 1}, "record": {"invalid": 2}},
        "unsigned_accepted": 4,
        "record_losses": 1,
    }
    snapshot = metrics.Snapshot({}, {}, 0, {}, 0, 0, False, [], status)
    text = metrics.render(lambda: snapshot).decode()
    assert 'stockade_cluster_refused_total{kind="event",reason="bad_tag"} 3.0' in text
    assert 'stockade_cluster_refused_total{kind="record",reason="invalid"} 2.0' in text
    assert "stockade_cluster_unsigned_accepted_total 4.0" in text
    assert "stockade_cluster_record_losses_total 1.0" in text
