"""Where a process sits in a multi-process job, from torchrun's variables or, under plain ``srun``, SLURM's.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``torch.distributed.init_process_group`` (``env://``) reads them. ``srun python -m rest_fast train ...`` starts
one process per task with none of these but with ``SLURM_PROCID`` (rank), ``SLURM_NTASKS`` (world size),
``SLURM_LOCALID`` (rank on the node), ``SLURM_NODELIST`` (hosts, compressed: ``gpu[01-04,07]``) and
``SLURM_JOB_ID``. :func:`launch_info` reads torchrun's variables when present, else SLURM's: the master is the
first host of the node list, the port ``15000 + job id mod 20000`` (every task of a job derives the same one;
``MASTER_ADDR``/``MASTER_PORT`` in the environment win). :func:`adopt_slurm_env` writes them back as torchrun's
variables, so everything downstream (process group, per-rank worker counts) sees one convention.
No ``scontrol`` is needed: :func:`expand_nodelist` parses SLURM's hostlist syntax.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from rest_fast.errors import UserError

SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchInfo:
    """One process's place in the job; ``source`` is ``"torchrun"``, ``"slurm"`` or ``"single"``."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    source: str


def _split_top_level(text: str) -> list[str]:
    """``"a[1-2],b,c[3,5]"`` → ``["a[1-2]", "b", "c[3,5]"]``: commas inside brackets do not split."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced ']' in SLURM node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UserError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range_set(body: str, text: str) -> list[str]:
    """``"01-03,07"`` → ``["01", "02", "03", "07"]`` (zero padding of the lower bound is kept)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise UserError(f"bad range {item!r} in SLURM node list {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise UserError(f"descending range {item!r} in SLURM node list {text!r}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """Every host of a SLURM node list, in order: ``"node[01-02,07],login"`` → ``node01 node02 node07 login``.

    Handles several bracket groups in one name (``rack[1-2]-n[1-2]``: the cartesian product, the last group
    varying fastest, as ``scontrol show hostnames`` prints them)."""
    hosts: list[str] = []
    for name in _split_top_level(text):
        pieces: list[list[str]] = []
        pos = 0
        for m in re.finditer(r"\[([^\]]*)\]", name):
            pieces.append([name[pos:m.start()]])
            pieces.append(_expand_range_set(m.group(1), text))
            pos = m.end()
        pieces.append([name[pos:]])
        hosts += ["".join(p) for p in itertools.product(*pieces)]
    if not hosts:
        raise UserError(f"empty SLURM node list {text!r}")
    return hosts


def tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from ``SLURM_TASKS_PER_NODE``'s form: ``"8(x2),4"`` → 8, 8, 4."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise UserError(f"bad SLURM tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise UserError(f"SLURM_NODEID={node_id} outside tasks-per-node {spec!r}")
    return counts[node_id]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise UserError(f"{name}={environ[name]!r} is not an integer") from None


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """This process's rank, world size, local rank and rendezvous address (see the module docstring)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "RANK" in env:  # torchrun (or a user who set them): they win over SLURM
        world = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
        port = env.get("MASTER_PORT")
        return LaunchInfo(rank=_int(env, "RANK") if "RANK" in env else 0, world_size=world,
                          local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                          local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1,
                          master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT") if port else None,
                          source="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        rank = _int(env, "SLURM_PROCID")
        if not 0 <= rank < world:
            raise UserError(f"SLURM_PROCID={rank} outside SLURM_NTASKS={world}")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "SLURM_NTASKS_PER_NODE" in env:
            local_world = _int(env, "SLURM_NTASKS_PER_NODE")
        else:
            spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
            node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            local_world = tasks_on_node(spec, node_id) if spec else 1
        addr = env.get("MASTER_ADDR")
        if addr is None:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
            addr = expand_nodelist(nodes)[0] if nodes else ("localhost" if world == 1 else None)
            if addr is None:
                raise UserError("SLURM_NTASKS > 1 but no SLURM_NODELIST (or MASTER_ADDR) to find the master host")
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        elif world == 1:
            port = None
        else:
            raise UserError("SLURM_NTASKS > 1 but no SLURM_JOB_ID (or MASTER_PORT) to derive the master port")
        return LaunchInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=max(1, local_world),
                          master_addr=addr, master_port=port, source="slurm")
    return LaunchInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr=None, master_port=None,
                      source="single")


def adopt_slurm_env(environ: MutableMapping[str, str] | None = None) -> LaunchInfo:
    """Under plain ``srun`` (SLURM variables, no torchrun ones), set torchrun's variables from SLURM's so
    ``init_process_group`` and the per-rank defaults read one convention; a no-op otherwise."""
    env = os.environ if environ is None else environ
    info = launch_info(env)
    if info.source == "slurm":
        env["RANK"], env["WORLD_SIZE"] = str(info.rank), str(info.world_size)
        env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = str(info.local_rank), str(info.local_world_size)
        if info.master_addr is not None:
            env["MASTER_ADDR"] = info.master_addr
        if info.master_port is not None:
            env["MASTER_PORT"] = str(info.master_port)
    return info
