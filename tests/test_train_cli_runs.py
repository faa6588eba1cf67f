"""`rest-fast train` never writes over a finished run: the demo moves aside, an explicit --out is refused."""

from __future__ import annotations

from rest_fast.cli import main
from rest_fast.train.command import _next_free_dir


def test_next_free_dir_skips_finished_runs(tmp_path):
    base = tmp_path / "demo"
    assert _next_free_dir(str(base)) == str(base)
    for d in (base, tmp_path / "demo-2"):
        d.mkdir()
        (d / "state.json").write_text("{}")
    assert _next_free_dir(str(base)) == str(tmp_path / "demo-3")


def test_explicit_out_holding_a_run_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text('{"epoch": 1}')
    assert main(["train", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err
    assert (run / "state.json").read_text() == '{"epoch": 1}'
