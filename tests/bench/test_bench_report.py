"""bench/README.md and its PNG plots, built from the committed bench/results/*.json.

Everything is written into a temporary directory: the committed README and
plots are never touched. matplotlib is Debian's python3-matplotlib, which
./scripts/bootstrap installs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package: import it from the tree
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"  # the committed ones, wherever STOCKADE_BENCH_OUT says

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.fixture(autouse=True)
def _matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        message = "matplotlib is missing: run ./scripts/bootstrap (Debian's python3-matplotlib)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)  # in CI the bootstrap installed it
        pytest.skip(message)


def committed_cases() -> list[str]:
    return [name for name in report.CASES if (RESULTS_DIR / f"{name}.json").exists()]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a complete PNG file."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name}: no IHDR chunk first"
    assert data.endswith(PNG_END), f"{path.name}: truncated (no IEND chunk at the end)"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def sections(readme: str) -> dict[str, str]:
    """The README's '## ' sections by heading."""
    parts = re.split(r"^(## .*)$", readme, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def case_heading(readme: str, number: int) -> str:
    found = [h for h in sections(readme) if h.startswith(f"## Case {number}")]
    assert len(found) == 1, (number, found)
    return found[0]


def test_every_case_has_its_results_committed() -> None:
    assert committed_cases() == list(report.CASES)


def test_readme_and_plots_from_the_committed_results(tmp_path: Path) -> None:
    from matplotlib import image

    readme = report.write_readme(tmp_path / "README.md", tmp_path / "results", RESULTS_DIR)
    text = readme.read_text()
    by_heading = sections(text)
    pngs = sorted((tmp_path / "results").glob("*.png"))
    assert pngs, "no plot was written"
    cases = committed_cases()
    assert len(pngs) >= len(cases)  # at least one plot per case
    linked = set()
    for number, name in enumerate(report.CASES, start=1):
        if name not in cases:
            continue
        section = by_heading[case_heading(text, number)]
        links = re.findall(r"!\[[^\]]+\]\((results/[^)]+\.png)\)", section)
        assert links, f"case {number} ({name}) links no plot"
        for link in links:
            path = tmp_path / link
            assert path.exists(), f"{link} is linked but was not written"
            width, height = png_size(path)
            assert 500 <= width <= 4000 and 300 <= height <= 3000, (link, width, height)
            assert path.stat().st_size > 10_000, f"{link}: suspiciously small"
            pixels = image.imread(path)
            assert pixels.shape[:2] == (height, width)
            assert pixels.std() > 0.05, f"{link} is blank"
            linked.add(path.name)
    assert {p.name for p in pngs} == linked, "a plot is written but not linked"


def test_a_missing_case_gets_no_plot_and_no_crash(tmp_path: Path) -> None:
    present = ("flood", "jwt")
    results = tmp_path / "in"
    results.mkdir()
    for name in present:
        shutil.copy(RESULTS_DIR / f"{name}.json", results)
    out = tmp_path / "out"
    readme = report.write_readme(out / "README.md", out / "plots", results_dir=results)
    text = readme.read_text()
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["flood.png", "jwt.png"]
    by_heading = sections(text)
    for number, name in enumerate(report.CASES, start=1):
        section = by_heading[case_heading(text, number)]
        if name in present:
            assert f"](plots/{name}.png)" in section
        else:
            assert "Not run yet." in section and ".png" not in section


def test_plots_follow_the_results(tmp_path: Path) -> None:
    """Changed results draw a different plot: the PNG is drawn from the data, not kept."""
    results = tmp_path / "in"
    results.mkdir()
    flood = json.loads((RESULTS_DIR / "flood.json").read_text())
    (results / "flood.json").write_text(json.dumps(flood))
    report.write_readme(tmp_path / "a" / "README.md", tmp_path / "a", results_dir=results)
    for variant in flood["variants"]:
        for sample in variant["samples"]:
            sample["softirq_s"] *= 2
    (results / "flood.json").write_text(json.dumps(flood))
    report.write_readme(tmp_path / "b" / "README.md", tmp_path / "b", results_dir=results)
    first, second = ((tmp_path / d / "flood.png").read_bytes() for d in ("a", "b"))
    assert first != second
