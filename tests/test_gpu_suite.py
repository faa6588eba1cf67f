"""bench/gpu_suite.sh tells the truth: a step is SKIPPED only for a requirement it declared, checked before it
runs; anything else that exits non-zero is FAILED and fails the suite; rows are written as steps end. The
plans here are planted (SUITE_PLAN), and the run is a SUITE_DEVICE=cpu dry run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
PLAN = ROOT / "bench" / "gpu_suite.plan"


def run_suite(tmp_path: Path, plan: str, **env: str) -> tuple[int, dict[str, list[str]], str]:
    plan_file = tmp_path / "planted.plan"
    plan_file.write_text(plan)
    out = tmp_path / "results"
    r = subprocess.run(["bash", str(SUITE), "--results", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "SUITE_DEVICE": "cpu", "SUITE_PLAN": str(plan_file), **env})
    rows = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, *rest = line.split("\t")
        rows[name] = rest
    return r.returncode, rows, r.stdout + r.stderr


def test_planted_missing_module_is_failed_not_skipped(tmp_path):
    plan = "\n".join([
        "# planted steps",
        "first       20  -                           echo first-table > $TABLE; echo 3 passed",
        "declared    20  module:rest_fast_absent_opt echo must-not-run; exit 3",
        # 'av' was on the old suite's optional list: a step that dies on it without declaring it fails.
        "planted     20  -                           $PY -c \"raise ModuleNotFoundError(\\\"No module named 'av'\\\")\"",
        "sees-first  20  -                           grep -q '^first\tok' $REST_FAST_BENCH_RESULTS/steps.tsv",
        "strict      20  -                           test \"$REST_FAST_STRICT$TRITON_INTERPRET\" = 10",
        "slow         1  -                           sleep 30",
        "",
    ])
    rc, rows, out = run_suite(tmp_path, plan)
    assert rc == 1, out
    assert rows["first"][0] == "ok" and rows["first"][3] == "3 passed"
    assert rows["declared"][0] == "SKIPPED" and "rest_fast_absent_opt" in rows["declared"][3]
    assert "must-not-run" not in (tmp_path / "results" / "gpu_suite.log").read_text()
    assert rows["planted"][0] == "FAILED" and "No module named 'av'" in rows["planted"][3]
    assert rows["sees-first"][0] == "ok"  # the first row was on disk before the next step started
    assert rows["strict"][0] == "ok"  # every step runs strict, compiled kernels
    assert rows["slow"][0] == "TIMEOUT"
    summary = (tmp_path / "results" / "summary.txt").read_text()
    assert re.search(r"planted\s+FAILED", summary) and "first-table" in summary


def test_a_clean_plan_exits_zero_and_bad_plans_are_refused(tmp_path):
    rc, rows, out = run_suite(tmp_path, "ok-step 10 - true\nskipped 10 file:no/such/file true\n")
    assert rc == 0, out
    assert rows["ok-step"][0] == "ok" and rows["skipped"][0] == "SKIPPED"
    rc, rows, out = run_suite(tmp_path, "typo 10 modul:x true\n")
    assert rc == 1 and rows["typo"][0] == "FAILED" and "unknown requirement" in rows["typo"][3]
    r = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SUITE_PLAN": str(tmp_path / "missing.plan")})
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.slow
def test_total_cap_stops_the_run_and_keeps_finished_rows(tmp_path):
    rc, rows, out = run_suite(tmp_path, "long 600 - sleep 60\nafter 10 - true\n", SUITE_TOTAL_CAP="15")
    assert rc == 1, out
    assert rows["long"][0] in ("TIMEOUT", "NOT-RUN") and rows["after"][0] == "NOT-RUN"


def plan_steps(path: Path) -> list[tuple[str, int]]:
    steps = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, cap, _req, _cmd = line.split(None, 3)
            steps.append((name, int(cap)))
    return steps


def test_default_plan_fits_the_device_window_most_important_first():
    steps = plan_steps(PLAN)
    names = [n for n, _ in steps]
    assert sum(cap for _, cap in steps) <= 9 * 60
    order = ["pytest-kernels", "bench-train-step", "bench-dwconv", "bench-retrieval", "bench-loaders"]
    assert [n for n in names if n in order] == order
    # The README lists the default plan with the same caps.
    readme = (ROOT / "README.md").read_text()
    for name, cap in steps:
        assert re.search(rf"\|\s*`{re.escape(name)}`\s*\|\s*{cap}\s*\|", readme), f"README lacks {name} ({cap} s)"


@pytest.mark.parametrize("plan", ["gpu_suite.plan", "gpu_suite_extra.plan"])
def test_plans_declare_known_requirements(plan):
    for line in (ROOT / "bench" / plan).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            _name, cap, req, cmd = line.split(None, 3)
            assert int(cap) > 0 and cmd
            for r in req.split(","):
                assert r in ("-", "cuda") or r.startswith(("module:", "file:")), line
