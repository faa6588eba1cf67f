"""The README's layering, enforced: "Imports point down: cli → train, eval → run → models, retrieval, data,
cache → nn → ops → kernels". Every import of a ``rest_fast`` module (top level or inside a function,
absolute or relative) is read with ``ast`` and checked against the layer table below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rest_fast

PKG = Path(rest_fast.__file__).parent

# rank of each top-level part of the package: a module may import its own part or a lower rank
RANK = {
    "__main__": 8,  # `python -m rest_fast`
    "cli": 7,
    "plan": 6.5,  # `rest-fast plan`: a command above the trainer (it reads the trainer's constants)
    "train": 6, "eval": 6, "info": 6,  # what the commands run
    "run": 5,
    "synthetic": 4.5,  # the demo's world and pretrained models: builds on models and clip, used by train
    "models": 4, "generation": 4, "clip": 4, "retrieval": 4, "data": 4, "cache": 4,
    "nn": 3,
    "ops": 2,
    "kernels": 1,
    "atomic_io": 0, "errors": 0, "comm": 0, "_C": 0, "_native": 0, "assets": 0, "__init__": 0,  # errors: UserError, raised at every rank
}
# parts of the same rank that may use each other: the captioner uses beam search and frozen CLIP's helpers.
# Everything else at one rank is independent (train and eval above all; data knows nothing of models).
SIBLINGS = {("models", "generation"), ("models", "clip")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rest_fast":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute rest_fast module) for every import in ``path``."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    return _imports_of(path.read_text(encoding="utf-8"), list(rel.parts[:-1]))


def _imports_of(text: str, pkg_parts: list[str]) -> list[tuple[int, str]]:
    """Imports in ``text``, a module of package ``pkg_parts`` (relative imports resolved against it)."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if mod == "rest_fast":  # `from rest_fast import eval` names a part
                out += [(node.lineno, f"rest_fast.{a.name}") for a in node.names
                        if (PKG / a.name).is_dir() or (PKG / f"{a.name}.py").is_file()]
    return [(ln, m) for ln, m in out if m == "rest_fast" or m.startswith("rest_fast.")]


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_has_a_rank():
    parts = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in _sources()}
    assert parts <= set(RANK), f"add {sorted(parts - set(RANK))} to RANK (and to the README's layering)"


def test_imports_point_down():
    bad = []
    for path in _sources():
        src = path.relative_to(PKG).parts[0].removesuffix(".py")
        for line, mod in _imports(path):
            dst = _part(mod)
            if dst is None or dst == src or dst == "__init__" or src == "__init__":
                continue  # the package root re-exports a few names (CaptionCache, __version__)
            if src not in RANK or dst not in RANK:
                continue  # reported by test_every_part_has_a_rank
            ok = RANK[dst] < RANK[src] or (src, dst) in SIBLINGS
            if not ok:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod} ({src} -> {dst})")
    assert not bad, "imports that point up or sideways:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize(("a", "b"), [("train", "eval"), ("eval", "train")])
def test_train_and_eval_do_not_import_each_other(a, b):
    hits = [f"{p.relative_to(PKG.parent)}:{ln}" for p in (PKG / a).rglob("*.py")
            for ln, m in _imports(p) if _part(m) == b]
    assert not hits, f"rest_fast.{a} imports rest_fast.{b}: {hits}"


def test_the_checker_sees_function_level_relative_and_package_imports():
    text = ("import os\n"
            "def f():\n    from rest_fast.train import loop\n    from ..train import demo\n"
            "    from rest_fast import eval as e\n    import rest_fast.cli\n")
    found = [m for _, m in _imports_of(text, ["rest_fast", "eval"])]
    assert found == ["rest_fast.train", "rest_fast.train", "rest_fast", "rest_fast.eval", "rest_fast.cli"]
