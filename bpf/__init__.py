"""The XDP data plane: C sources and the shared header, installed as package data."""

from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent
HEADER = BPF_DIR / "stockade.h"
XDP_SOURCE = BPF_DIR / "stockade_xdp.c"
