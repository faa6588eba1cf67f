"""Which wheels a wheelhouse needs: the dependency closure of the wanted packages for a TARGET interpreter,
minus what the target machine already has (the closure of its base packages).

pip cannot resolve this in one go: resolving anything that depends on torch pulls torch's CUDA wheels, which
the registry may not serve and which must not travel anyway. So the closure is walked here level by level,
one ``pip install --dry-run --no-deps --report`` per level (metadata only, nothing large is downloaded),
evaluating each ``Requires-Dist`` marker for the target (CPython ``--python-version``, Linux x86_64), and
stopping at what the target has (the base packages and their closure, walked only to know the names). The
direct dependencies of ``--carry-deps-of`` packages (the test tools: pytest's pygments, pluggy, ...) are
carried even when the target has them: a few small wheels that make the tests install on a barer machine
too. Prints ``name==version`` lines, one per wheel to fetch.

    python bench/wheelhouse_plan.py --python-version 3.12 --base "torch==2.11.0 transformers==5.17.0" \\
        --platform manylinux_2_28_x86_64 pytest av open_clip_torch
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version


def target_env(python_version: str) -> dict[str, str]:
    full = python_version if python_version.count(".") >= 2 else python_version + ".0"
    return {"python_version": ".".join(full.split(".")[:2]), "python_full_version": full,
            "implementation_name": "cpython", "implementation_version": full, "platform_python_implementation":
            "CPython", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "platform_release": "", "platform_version": "", "extra": ""}


def applies(marker: Marker | None, env: dict[str, str], extras: set[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({**env, "extra": e}) for e in (extras or {""}) | {""})


def resolve_level(reqs: dict[str, str], pip_args: list[str]) -> dict[str, dict]:
    """``{name: metadata}`` of the best wheel for each ``name -> 'name<spec>'`` (metadata only)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
               "--quiet", "--report", str(report), "--target", str(Path(tmp) / "t"), "--only-binary=:all:",
               *pip_args, *reqs.values()]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            err = [ln for ln in r.stderr.splitlines() if "is ignored" not in ln]
            raise SystemExit("wheelhouse_plan: pip could not resolve " + " ".join(reqs.values()) + ":\n"
                             + "\n".join(err[-6:]))
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"]
                for i in json.loads(report.read_text())["install"]}


# torch's CUDA libraries: large, on every GPU image with torch, and not all served by the registry; never
# resolved, never carried.
CUDA_PREFIXES = ("nvidia-", "cuda-")


def closure(roots: list[str], env: dict[str, str], pip_args: list[str], *,
            stop: set[str] = frozenset()) -> dict[str, dict]:
    """Metadata of every package reached from ``roots``; names in ``stop`` are resolved but not walked."""
    specs: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    found: dict[str, dict] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        level: dict[str, str] = {}
        for req in todo:
            name = canonicalize_name(req.name)
            specs[name] = specs.get(name, SpecifierSet()) & req.specifier
            extras.setdefault(name, set()).update(req.extras)
            chosen = found.get(name)
            if chosen is None or Version(chosen["version"]) not in specs[name] or req.extras:
                level[name] = f"{name}{specs[name]}"
        todo = []
        if not level:
            break
        for name, meta in resolve_level(level, pip_args).items():
            found[name] = meta
            if name in stop:
                continue
            for line in meta.get("requires_dist", []) or []:
                dep = Requirement(line)
                if applies(dep.marker, env, extras.get(name, set())):
                    dep_name = canonicalize_name(dep.name)
                    if dep_name.startswith(CUDA_PREFIXES):
                        continue
                    if dep_name not in found or Version(found[dep_name]["version"]) not in dep.specifier:
                        todo.append(dep)
                    elif dep.extras - extras.get(dep_name, set()):
                        todo.append(dep)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+", help="what the wheelhouse must make installable")
    ap.add_argument("--base", default="", help="what the target has (space-separated requirements)")
    ap.add_argument("--python-version", required=True, help="the target's Python, e.g. 3.12 or 3.12.3")
    ap.add_argument("--platform", action="append", default=[], help="wheel platform tags (pip --platform)")
    ap.add_argument("--carry-deps-of", default="", help="packages whose direct dependencies are always carried")
    args = ap.parse_args(argv)
    env = target_env(args.python_version)
    short = env["python_version"]
    pip_args = ["--python-version", short, "--implementation", "cp", "--abi", f"cp{short.replace('.', '')}",
                "--abi", "abi3", "--abi", "none"]
    for p in args.platform:
        pip_args += ["--platform", p]
    base = args.base.split()
    base_names = {canonicalize_name(Requirement(b).name) for b in base}
    have = closure(base, env, pip_args) if base else {}  # what the target has: the base and its closure
    want = closure(args.packages, env, pip_args, stop=base_names | set(have))
    direct = set()
    for p in args.carry_deps_of.split():
        for line in want[canonicalize_name(p)].get("requires_dist") or []:
            dep = Requirement(line)
            if applies(dep.marker, env, set()):
                direct.add(canonicalize_name(dep.name))
    for name in sorted(set(want) - ((set(have) | base_names) - direct) - base_names):
        print(f"{want[name]['name']}=={want[name]['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
