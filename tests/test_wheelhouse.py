"""The wheelhouse installs offline on a bare machine: built by bench/make_wheelhouse.sh for THIS interpreter
(the GPU image's is CPython 3.12; the recipe is the same), installed with ``--no-index`` by the suite's own
installer into a fresh venv that holds only torch, triton and transformers (and torchvision, which the GPU
image has and open_clip needs), with their own dependencies, then ``pytest --collect-only -m gpu`` and one
bench ``--quick`` run there. Needs the package registry to build; skipped with the reason when unreachable."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BASE = ("torch", "triton", "transformers", "torchvision")

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """No pip configuration (this machine's find-links / extra indexes would let pip see other wheels)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def installed_closure(roots) -> list[md.Distribution]:
    """The installed distributions reached from ``roots`` through their (marker-evaluated) requirements,
    extras included (torch's ``cuda-toolkit[cudart, ...]``)."""
    env = default_environment()
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        raw, extra = todo.pop()
        name = canonicalize_name(raw)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = seen.get(name) or md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement that is not installed here
        seen[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                todo += [(req.name, e) for e in req.extras | {""}]
    return list(seen.values())


def base_only_site(dest: Path) -> None:
    """``dest`` gets a symlink to every top-level file/folder of the base distributions and their dependencies."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for dist in installed_closure(BASE):
        for f in dist.files or []:
            top = f.parts[0]
            src = Path(dist.locate_file(top))
            if top == ".." or not src.exists() or (dest / top).exists() or src.parent != site:
                continue
            (dest / top).symlink_to(src)


def registry_reachable(tmp: Path) -> str | None:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "braceexpand"],
                       capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["pip download failed"])[-1]


def test_wheelhouse_installs_offline_in_a_bare_venv(tmp_path):
    why = registry_reachable(tmp_path / "probe")
    if why:
        pytest.skip(f"the package registry is unreachable: {why}")
    wh = tmp_path / "wheelhouse"
    pins = " ".join(f"{d}=={md.version(d).split('+')[0]}" for d in BASE)
    pyver = ".".join(map(str, sys.version_info[:3]))
    r = subprocess.run(["bash", "bench/make_wheelhouse.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "PYVER": pyver, "BASE": pins, "DEST": str(wh), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = {p.name.split("-")[0].lower() for p in wh.glob("*.whl")}
    assert {"pytest", "pygments", "pluggy", "av", "open_clip_torch", "webdataset"} <= names, names
    assert not names & {"torch", "triton", "transformers", "torchvision"}
    assert sum(p.stat().st_size for p in wh.glob("*.whl")) <= 60 << 20

    # A fresh venv whose only packages are the base ones (a .pth onto their symlinks), pip from ensurepip.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, symlinks=True)
    py = env_dir / "bin" / "python"
    # ensurepip's own setuptools (old) would shadow the base's: the base packages bring theirs.
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], capture_output=True,
                   env=clean_env(), timeout=300, check=True)
    base_only_site(tmp_path / "base")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "base_packages.pth").write_text(str(tmp_path / "base") + "\n")
    # (pygments may be there already: transformers' own dependencies can bring it.)
    probe = subprocess.run([str(py), "-c", "import torch, triton, transformers\n"
                            "import importlib.util as u\n"
                            "print([m for m in ('pytest', 'hypothesis', 'av', 'open_clip', 'webdataset')"
                            "       if u.find_spec(m)])"],
                           capture_output=True, text=True, env=clean_env(), timeout=600)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr[-2000:]

    env = clean_env(PY=str(py), PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", "bench/install_wheelhouse.sh", str(wh)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([str(py), "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    collected = re.search(r"(\d+)/\d+ tests collected", r.stdout)
    assert r.returncode == 0 and collected and int(collected[1]) > 0, r.stdout[-3000:] + r.stderr[-3000:]
    with tempfile.TemporaryDirectory() as results:
        r = subprocess.run([str(py), "bench/train_step.py", "--quick", "--device", "cpu"], cwd=ROOT,
                           capture_output=True, text=True, env={**env, "REST_FAST_BENCH_RESULTS": results},
                           timeout=900)
        assert r.returncode == 0 and "clips/s" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        assert Path(results, "train_step.csv").exists()


def test_gpu_image_wheelhouse_fits_and_carries_what_the_image_lacks(tmp_path):
    # The default target: the lent GPU image (CPython 3.12.3, torch 2.11, triton 3.6, transformers 5.17,
    # torchvision 0.26). Resolution is metadata only; the wheels are downloaded to check the 60 MiB limit.
    why = registry_reachable(tmp_path / "probe")
    if why:
        pytest.skip(f"the package registry is unreachable: {why}")
    wh = tmp_path / "wheelhouse"
    r = subprocess.run(["bash", "bench/make_wheelhouse.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "DEST": str(wh), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(wh.glob("*.whl"))
    names = {p.name.split("-")[0].lower() for p in wheels}
    assert {"pytest", "pygments", "pluggy", "iniconfig", "av", "open_clip_torch", "ftfy", "webdataset",
            "braceexpand"} <= names, names
    assert not names & {"torch", "triton", "transformers", "torchvision", "numpy"}, names
    assert all(("cp312" in p.name or "abi3" in p.name or "py3-none" in p.name or "py2.py3-none" in p.name)
               for p in wheels), [p.name for p in wheels]
    assert sum(p.stat().st_size for p in wheels) <= 60 << 20
    assert (wh / "packages.txt").read_text().split() == ["pytest", "hypothesis", "pybind11", "av",
                                                         "open_clip_torch", "webdataset"]
