"""`rest-fast info` and the command-line entry points."""

from __future__ import annotations

import json
import subprocess
import sys

from rest_fast import cache
from rest_fast.cli import main


def test_info_json_reports_native_triton_cuda_dali(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("rest_fast", "torch", "triton", "native extension", "cuda devices", "dali",
                "triton interpreter (TRITON_INTERPRET)", "fast paths"):
        assert key in info, key
    if cache.NATIVE_AVAILABLE:
        assert info["native extension"].startswith("loaded")
    else:
        assert cache.NATIVE_ERROR and cache.NATIVE_ERROR in info["native extension"]
    assert info["fast paths"] == "all available" or info["fast paths"].split(":")[0].endswith("degraded")


def test_info_without_native_extension_says_why():
    # The kill switch is honoured at import: a fresh interpreter reports the pure-Python cache and the reason.
    code = "import json, rest_fast.info as i; print(json.dumps(i.collect()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "REST_FAST_NO_NATIVE": "1"}).stdout
    info = json.loads(out)
    assert info["native extension"].startswith("not loaded")
    assert "REST_FAST_NO_NATIVE" in info["native extension"]
    assert info["caption cache backend"].endswith("PyCaptionCache")


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "rest_fast", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "info" in out.stdout
