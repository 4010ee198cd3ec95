"""The one command table shared by the control API, the CLI and the docs.

Wire format: one JSON object per line over the unix socket.
  request: {"command": "ban", "args": {"target": "198.18.0.7", "ttl": "1h"}}
  reply:   {"ok": true, "result": ...}
       or  {"ok": false, "error": {"kind": "bad_input", "message": "...", "hint": "..."}}

Two sockets serve it: the control socket (root only, every command) and the
rules socket for the proxy (only the commands marked `rules_socket`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024
# A batch (ban.batch, unban.batch) streams in chunks of whole lines under MAX_LINE,
# staged on its connection; this bounds what one connection may stage.
MAX_BATCH = 300_000
MAX_REFUSED_SHOWN = 1_000  # refused entries listed in an error reply

# Error kinds and the CLI exit code each maps to.
BAD_INPUT = "bad_input"
NOT_FOUND = "not_found"
RUNTIME = "runtime"
EXIT_CODES = {BAD_INPUT: 2, NOT_FOUND: 1, RUNTIME: 1}


# Argument kinds that do not travel as a JSON string.
NUMBER = "number"  # a finite JSON number
OBJECT = "object"  # a JSON object
BOOLEAN = "boolean"  # true or false
ARRAY = "array"  # a JSON array (the command checks its items)


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "target", "duration", "text" (JSON strings), NUMBER, OBJECT, BOOLEAN or ARRAY
    help: str
    required: bool = False


@dataclass(frozen=True)
class CommandSpec:
    name: str  # wire name
    usage: str  # how the CLI spells it
    help: str
    params: tuple[Param, ...] = ()
    rules_socket: bool = False  # also accepted on the proxy's rules socket
    # The CLI command that sends it, when that is an option of another command
    # (`stockade ban --file` sends ban.batch); "" = the command named like it.
    cli: str = ""


TARGET = Param("target", "target", "IPv4/IPv6 address or CIDR prefix", required=True)
FORCE_PREFIX = Param(
    "force",
    BOOLEAN,
    "accept a prefix broader than xdp.min_prefix_v4 / min_prefix_v6 (default /8 and /16)",
)
COMMIT = Param(
    "commit",
    BOOLEAN,
    "true on the last chunk: check the whole batch, then apply all of it or nothing",
)

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(
        "ban",
        "stockade ban TARGET [--ttl 1h] [--reason TEXT] [--force] [--json]",
        "Drop all traffic from TARGET in the kernel, until the TTL runs out or forever.",
        (
            TARGET,
            Param("ttl", "duration", "how long the ban lasts (90s, 15m, 1h, 7d); none = permanent"),
            Param("reason", "text", "why, shown in `stockade bans` (at most 200 characters)"),
            Param("source", "text", "who decided: cli, proxy, cluster or rule (default cli)"),
            FORCE_PREFIX,
        ),
    ),
    CommandSpec(
        "ban.batch",
        "stockade ban --file FILE [--ttl 1h] [--reason TEXT] [--force] [--json]",
        "Ban many targets at once, all or nothing: chunks of `entries` staged on one "
        "connection, then checked as a whole and written in one store transaction and "
        f"batched map updates when `commit` is true (at most {MAX_BATCH} entries).",
        (
            Param(
                "entries",
                ARRAY,
                "objects {target, ttl, reason}: target required, ttl and reason as for `ban`",
                True,
            ),
            COMMIT,
            FORCE_PREFIX,
        ),
        cli="ban",
    ),
    CommandSpec("unban", "stockade unban TARGET [--json]", "Lift the ban on TARGET.", (TARGET,)),
    CommandSpec(
        "unban.batch",
        "stockade unban --file FILE [--json]",
        "Lift many bans at once, all or nothing: every target must be banned. Chunks staged "
        "on one connection as for ban.batch.",
        (Param("entries", ARRAY, "objects {target}", True), COMMIT),
        cli="unban",
    ),
    CommandSpec(
        "unban.all",
        "stockade unban --all [--source S] [--reason-match TEXT] [--force] [--json]",
        "Lift every ban that matches the filters, in one transaction; without a filter "
        "it lifts every ban and needs force.",
        (
            Param("source", "text", "only bans from this source (cli, proxy, cluster, rule)"),
            Param("reason_match", "text", "only bans whose reason contains this (any case)"),
            Param("force", BOOLEAN, "needed to lift every ban (no filter)"),
        ),
        cli="unban",
    ),
    CommandSpec(
        "bans",
        "stockade bans [--source S] [--filter TEXT] [--json]",
        "List bans with their expiry and kernel hit counters.",
        (
            Param("source", "text", "only bans from this source (cli, proxy, cluster, rule)"),
            Param("filter", "text", "only bans whose target or reason contains this (any case)"),
        ),
    ),
    CommandSpec(
        "allow.add",
        "stockade allow add TARGET [--reason TEXT] [--force] [--json]",
        "Always pass TARGET, even if it is banned.",
        (TARGET, Param("reason", "text", "why (at most 200 characters)"), FORCE_PREFIX),
    ),
    CommandSpec(
        "allow.remove",
        "stockade allow remove TARGET [--json]",
        "Remove TARGET from the allowlist.",
        (TARGET,),
    ),
    CommandSpec(
        "allow.list",
        "stockade allow list [--json]",
        "List the allowlist, management networks from the config included.",
    ),
    CommandSpec(
        "rule.ban",
        "stockade rule ban TARGET --ttl 10m --rule NAME [--reason TEXT] [--details JSON] "
        "[--factor 2] [--max-ttl 1d] [--memory 7d] [--json]",
        "Ban TARGET for a proxy rule; a repeat offender's ban is longer: "
        "ttl x factor^n, at most max_ttl, for n earlier rule bans of TARGET within memory.",
        (
            TARGET,
            Param("ttl", "duration", "the ban of a first offence (90s, 15m, 1h, 7d)", True),
            Param(
                "rule",
                "text",
                "the rule's name: letters, digits, _ . : - (at most 64 characters)",
                True,
            ),
            Param("reason", "text", "why (at most 200 characters); default `rule NAME`"),
            Param(
                "details",
                OBJECT,
                "what fired the rule (its counters), kept with the ban and shown by "
                "`stockade explain`; at most 4096 bytes as JSON",
            ),
            Param("factor", NUMBER, "growth per earlier offence, at least 1 (default 2)"),
            Param("max_ttl", "duration", "the longest ban escalation gives (default 1d)"),
            Param("memory", "duration", "how far back earlier rule bans count (default 7d)"),
        ),
        rules_socket=True,
    ),
    CommandSpec(
        "explain",
        "stockade explain TARGET [--json]",
        "Why TARGET is or is not dropped: the bans and allowlist entries that cover it, "
        "and its recent ban history.",
        (TARGET,),
    ),
    CommandSpec(
        "stats", "stockade stats [--json]", "Packets and bytes per verdict reason, from the kernel."
    ),
    CommandSpec(
        "status",
        "stockade status [--json]",
        "Attached interfaces, XDP mode, program id, ban and allow counts.",
    ),
    CommandSpec(
        "detach",
        "stockade detach IFACE... | --all [--force] [--json]",
        "Remove stockade's XDP program from interfaces (logged); they stay detached, also "
        "across restarts, until `stockade attach`. A program that is not stockade's is "
        "refused unless force.",
        (
            Param("interfaces", ARRAY, "interface names (strings)"),
            Param("all", BOOLEAN, "every interface in xdp.interfaces"),
            Param("force", BOOLEAN, "also remove an XDP program that is not stockade's"),
        ),
    ),
    CommandSpec(
        "attach",
        "stockade attach IFACE... [--json]",
        "Attach stockade's XDP program to interfaces of xdp.interfaces again after "
        "`stockade detach`.",
        (Param("interfaces", ARRAY, "interface names (strings) from xdp.interfaces", True),),
    ),
    CommandSpec(
        "reload",
        "stockade reload [--json]",
        "Re-read the config file: the controller applies what can change while running "
        "(SYN rate, monitor mode, management networks, interfaces) and reports what needs "
        "a restart; the proxy (signalled too) starts workers with the new config and drains "
        "the old ones. A config that does not load changes nothing.",
    ),
)

COMMANDS_BY_NAME = {spec.name: spec for spec in COMMANDS}
RULES_SOCKET_COMMANDS = frozenset(spec.name for spec in COMMANDS if spec.rules_socket)


class CommandError(Exception):
    """A command failed; `kind` decides the exit code, `hint` says what to do.

    `refused`: for a batch, the entries refused and why ({"entry": n, "target":
    ..., "error": ...}); the wire carries at most MAX_REFUSED_SHOWN of them and
    `refused_total`, how many there were.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        hint: str | None = None,
        refused: list[dict[str, Any]] | None = None,
        refused_total: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.hint = hint
        self.refused = refused or []
        self.refused_total = len(self.refused) if refused_total is None else refused_total

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"kind": self.kind, "message": self.message, "hint": self.hint}
        if self.refused:
            error["refused"] = self.refused[:MAX_REFUSED_SHOWN]
            error["refused_total"] = self.refused_total
        return {"ok": False, "error": error}

    def to_wire_bytes(self) -> bytes:
        return encode(self.to_wire())

    @classmethod
    def from_wire(cls, error: dict[str, Any]) -> CommandError:
        kind = error.get("kind") if error.get("kind") in EXIT_CODES else RUNTIME
        refused = error.get("refused")
        total = error.get("refused_total")
        return cls(
            str(kind),
            str(error.get("message", "unknown error")),
            error.get("hint"),
            [r for r in refused if isinstance(r, dict)] if isinstance(refused, list) else None,
            total if isinstance(total, int) and not isinstance(total, bool) else None,
        )


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def request(command: str, **args: Any) -> bytes:
    return encode({"command": command, "args": {k: v for k, v in args.items() if v is not None}})


def decode_request(line: bytes) -> tuple[CommandSpec, dict[str, Any]]:
    """Parse and check one request line against the command table."""
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CommandError(BAD_INPUT, "request is not valid JSON") from None
    except RecursionError:
        raise CommandError(BAD_INPUT, "request is nested too deeply") from None
    if not isinstance(message, dict):
        raise CommandError(BAD_INPUT, "request must be a JSON object")
    name = message.get("command")
    spec = COMMANDS_BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None:
        raise CommandError(BAD_INPUT, f"unknown command {name!r}", "see `stockade --help`")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise CommandError(BAD_INPUT, "args must be a JSON object")
    allowed = {p.name for p in spec.params}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CommandError(BAD_INPUT, f"{spec.name}: unknown argument {unknown[0]!r}")
    for param in spec.params:
        value = args.get(param.name)
        if value is None:
            if param.required:
                raise CommandError(BAD_INPUT, f"{spec.name}: missing argument {param.name!r}")
            continue
        _check_kind(spec, param, value)
    return spec, args


def _check_kind(spec: CommandSpec, param: Param, value: Any) -> None:
    where = f"{spec.name}: {param.name}"
    if param.kind == NUMBER:
        # bool is an int in Python, but never a number on the wire
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandError(BAD_INPUT, f"{where} must be a number")
        if not math.isfinite(value):
            raise CommandError(BAD_INPUT, f"{where} must be a finite number")
    elif param.kind == OBJECT:
        if not isinstance(value, dict):
            raise CommandError(BAD_INPUT, f"{where} must be a JSON object")
    elif param.kind == BOOLEAN:
        if not isinstance(value, bool):
            raise CommandError(BAD_INPUT, f"{where} must be true or false")
    elif param.kind == ARRAY:
        if not isinstance(value, list):
            raise CommandError(BAD_INPUT, f"{where} must be a JSON array")
    elif not isinstance(value, str):
        raise CommandError(BAD_INPUT, f"{where} must be a string")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/control-api.md, generated from the command table (a unit test keeps them equal).

    Regenerate with `python -m stockade.protocol > docs/control-api.md`.
    """
    lines = [
        "# Control API",
        "",
        "<!-- Generated from stockade/protocol.py by render_markdown(); do not edit.",
        "     Regenerate: python -m stockade.protocol > docs/control-api.md -->",
        "",
        "The controller serves this API on a unix socket (default",
        "`/run/stockade/control.sock`, mode 0600, root only). The `stockade` CLI is a client",
        "of it; every command below is also a CLI command.",
        "",
        "A second socket, for the proxy (`controller.rules_socket`, default",
        "`/run/stockade/rules.sock`), accepts only the commands marked *rules socket* below.",
        "It is root only (mode 0600) unless `controller.rules_group` names a group: then it",
        "belongs to that group with mode 0660, and a peer whose uid is 0 or the controller's,",
        "whose gid is that group, or whose user is a member of it may use it. Any other command",
        "sent there is refused with `runtime` (permission denied) and changes nothing.",
        "",
        f"Protocol version {PROTOCOL_VERSION}. One JSON object per line (UTF-8, at most",
        f"{MAX_LINE} bytes), one reply line per request; a connection may carry several.",
        "",
        "```",
        'request: {"command": "ban", "args": {"target": "198.18.0.7", "ttl": "1h"}}',
        'reply:   {"ok": true, "result": ...}',
        'error:   {"ok": false, "error": {"kind": "bad_input", "message": "...", "hint": "..."}}',
        "```",
        "",
        "Every argument is a JSON string, except those of kind `number` (a finite JSON number),",
        "`object` (a JSON object), `boolean` (true or false) and `array` (a JSON array);",
        "`args` may be omitted when a command takes none.",
        "An unknown command, an unknown or missing argument, or a value of the wrong JSON type",
        "is refused with `bad_input` and changes nothing. The results are described in",
        "[cli-json.md](cli-json.md): the CLI's `--json` prints them as they arrive.",
        "",
        "## Batches",
        "",
        "`ban.batch` and `unban.batch` carry many targets. A batch is sent as chunks, each",
        f"one request line under {MAX_LINE} bytes, on one connection: every chunk but the",
        "last has `commit: false` and is checked and staged (the reply counts what is",
        "staged); the last has `commit: true`. Then the whole batch is checked against the",
        "store (allowlist, minimum prefix) and applied in one store transaction and batched",
        "map updates (`BPF_MAP_UPDATE_BATCH`; a map that would overflow undoes them: `runtime`),",
        "or, if any entry is refused, not at all: the error reply lists the refused entries",
        "(`refused`: entry number from 1 across",
        f"the batch, target, error; at most {MAX_REFUSED_SHOWN}; `refused_total`: how many) and",
        "nothing is changed. A chunk that is refused fails the rest of its batch, up to and",
        "including the one with `commit`, so a client may send every chunk before reading the",
        "replies. A connection stages one batch at a time, of at most",
        f"{MAX_BATCH} entries (all connections together too); closing it drops what it staged.",
        "",
        "## Error kinds",
        "",
        "| kind | CLI exit code | meaning |",
        "|---|---|---|",
    ]
    meanings = {
        BAD_INPUT: "the request is invalid; nothing was changed",
        NOT_FOUND: "the target is not banned or not in the allowlist; nothing was changed",
        RUNTIME: "the controller could not do it (map full, store error, internal error)",
    }
    lines += [f"| `{kind}` | {code} | {meanings[kind]} |" for kind, code in EXIT_CODES.items()]
    lines += ["", "## Commands", ""]
    for spec in COMMANDS:
        lines += [f"### `{spec.name}`", "", spec.help, "", f"CLI: `{spec.usage}`", ""]
        if spec.rules_socket:
            lines += ["Sockets: the control socket and the *rules socket*.", ""]
        if not spec.params:
            lines += ["Arguments: none.", ""]
            continue
        lines += ["| argument | kind | required | meaning |", "|---|---|---|---|"]
        lines += [
            f"| `{p.name}` | {p.kind} | {'yes' if p.required else 'no'} | {_cell(p.help)} |"
            for p in spec.params
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
