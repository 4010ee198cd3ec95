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


def test_the_plan_fits_the_budget_with_rounds_for_medians() -> None:
    from bench import plan

    assert [case.name for case in plan.PLAN] == list(report.CASES)
    assert plan.estimate_s() <= 0.9 * plan.BUDGET_S  # a margin for a busier host
    for case in plan.PLAN:
        args = dict(zip(case.args[::2], case.args[1::2], strict=True))
        if "--rounds" in args:
            assert int(args["--rounds"]) >= 5, case.name


def test_the_intro_gives_every_case_its_command() -> None:
    from bench import plan

    results = report.load_all(RESULTS_DIR)
    for run in (results["run"], None):  # the committed run record, and none at all
        text = report.render_readme({**results, "run": run})
        intro = text.split("## Summary")[0]
        for case in plan.PLAN:
            assert f"    {case.command()} " in intro, case.name
        assert "make bench" in intro
        assert ("No `make bench` run recorded yet" in text) == (run is None)


def test_the_run_record_shows_each_case_and_the_total() -> None:
    from bench import plan

    cases = [
        {
            "name": case.name,
            "command": case.command(),
            "ok": case.name != "waf",
            "elapsed_s": 100.0 + n,
            "estimate_s": case.estimate_s,
        }
        for n, case in enumerate(plan.PLAN)
    ]
    run = {
        "date": "2026-11-24 05:00 UTC",
        "command": "make bench",
        "source": "abc1234",
        "budget_s": plan.BUDGET_S,
        "total_s": 1000.0,
        "cases": cases,
    }
    text = report.render_readme({**report.load_all(RESULTS_DIR), "run": run})
    section = sections(text)["## Run time"]
    assert "1000 s (16.7 min)" in section and "**met**" in section
    for case in cases:
        assert f"`{case['command']}` | {case['elapsed_s']:.0f} s |" in section
    assert section.count("**failed**") == 1
    intro = text.split("## Summary")[0]
    assert "17 minutes in the run below" in intro
    over = report.render_run({**run, "total_s": 1300.0})
    assert "**not met**" in over
    smoke = {**run, "command": "bench.run --smoke", "smoke": True, "total_s": 200.0}
    text = report.render_readme({**report.load_all(RESULTS_DIR), "run": smoke})
    assert "no verdict: a smoke run" in sections(text)["## Run time"]
    assert "not recorded yet" in sections(text)["## Summary"]
    assert "minutes here, estimated" in text.split("## Summary")[0]


def test_the_summary_states_every_issue_target() -> None:
    text = report.render_readme(report.load_all(RESULTS_DIR))
    summary = sections(text)["## Summary"]
    targets = summary.split("Findings:")[0]
    for issue in (2, 3, 4, 5, 6, 8, 10):
        assert f"(issue {issue}," in targets, f"issue {issue}'s targets are not in the Summary"
    verdicts = [line for line in targets.splitlines() if line.startswith("- ")]
    assert len(verdicts) >= 14
    for line in verdicts:
        assert "**met**" in line or "**not met**" in line or "not recorded yet" in line, line
    missing = report.render_summary({"flood": report.load_all(RESULTS_DIR)["flood"]})
    assert "case 7 has no results" in missing and "case 8 has no results" in missing
