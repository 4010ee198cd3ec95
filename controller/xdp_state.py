"""What stockade remembers about its XDP attachments, in the state directory.

- The tags of the programs stockade's controller loaded on this host, newest
  first. A program is stockade's when its name is `xdp_stockade` and its tag
  is one of these: `stockade detach` without a controller recognises it the
  way the controller does, and leaves any other program alone.
- The interfaces detached on purpose through the controller (`stockade
  detach` while it runs). They stay detached across its restarts until
  `stockade attach` re-attaches them, or a reload newly names them in
  xdp.interfaces.

The file is small JSON, written whole and renamed into place. One that is
missing or unreadable reads as empty: no interface is held detached (the
controller attaches, which is the closed default) and no tag is known (a
detach without a controller then refuses the program unless forced).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.controller.libbpf import ProgInfo
from stockade.controller.loader import XDP_FUNCTION

log = logging.getLogger(__name__)

STATE_FILE = "xdp.json"
MAX_TAGS = 16  # programs of earlier versions may still run somewhere after upgrades
PROGRAM_NAME = XDP_FUNCTION[:15]  # the kernel keeps 15 bytes of a program's name


@dataclass
class AttachState:
    tags: list[str] = field(default_factory=list)  # newest first
    detached: dict[str, float] = field(default_factory=dict)  # interface -> since (wall clock)

    def remember(self, tag: str) -> None:
        self.tags = [tag, *(t for t in self.tags if t != tag)][:MAX_TAGS]

    def is_stockade(self, info: ProgInfo) -> bool:
        return info.name == PROGRAM_NAME and info.tag in self.tags


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def read_state(state_dir: Path) -> AttachState:
    path = state_path(state_dir)
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return AttachState()
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): no interface is held detached", path, exc)
        return AttachState()
    if not isinstance(data, dict):
        log.warning("%s is not a JSON object: no interface is held detached", path)
        return AttachState()
    tags = data.get("tags")
    detached = data.get("detached")
    return AttachState(
        [t for t in tags if isinstance(t, str)][:MAX_TAGS] if isinstance(tags, list) else [],
        {
            str(name): float(at)
            for name, at in (detached.items() if isinstance(detached, dict) else ())
            if isinstance(at, int | float) and not isinstance(at, bool)
        },
    )


def write_state(state_dir: Path, state: AttachState) -> None:
    """Write the whole file and rename it into place (a reader sees the old or the new)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_path(state_dir)
    partial = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    text = json.dumps({"tags": state.tags, "detached": state.detached}, indent=2, sort_keys=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def mark_detached(state: AttachState, names: list[str]) -> None:
    now = time.time()
    for name in names:
        state.detached.setdefault(name, now)
