"""Multi-node training (issue 21 item 4): SLURM's variables under plain `srun`, its node-list syntax, the
shared-filesystem check, and two `torchrun --nnodes 2` agents (c10d rendezvous on localhost, gloo) training
like one agent with two ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rest_fast.errors import UserError
from rest_fast.run.launch import adopt_slurm_env, expand_nodelist, launch_info, tasks_on_node

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize("text, hosts", [
    ("node07", ["node07"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("login-[3]", ["login-3"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node]1[", "node[a-b]", "node[5-2]", ""])
def test_bad_nodelist_is_one_user_error(bad):
    with pytest.raises(UserError, match="SLURM node list"):
        expand_nodelist(bad)


def test_tasks_on_node():
    assert [tasks_on_node("8(x2),4", i) for i in range(3)] == [8, 8, 4]
    assert tasks_on_node("2", 0) == 2
    with pytest.raises(UserError):
        tasks_on_node("8(x2)", 2)


SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_NODELIST": "gpu[03-04,09,11]", "SLURM_JOB_ID": "4242017"}


def test_launch_info_from_slurm_variables_only():
    info = launch_info(dict(SLURM))
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 2)
    assert info.master_addr == "gpu03" and info.source == "slurm"
    assert info.master_port == 15000 + 4242017 % 20000
    # every task of the job derives the same address and port
    other = launch_info({**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert (other.master_addr, other.master_port) == (info.master_addr, info.master_port)
    # explicit MASTER_ADDR / MASTER_PORT and SLURM_NTASKS_PER_NODE win
    over = launch_info({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "29400", "SLURM_NTASKS_PER_NODE": "4"})
    assert (over.master_addr, over.master_port, over.local_world_size) == ("head", 29400, 4)


def test_torchrun_variables_win_over_slurm():
    env = {**SLURM, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    info = launch_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (1, 2, 1, "torchrun")
    before = dict(env)
    adopt_slurm_env(env)
    assert env == before  # torchrun's variables are left alone
    assert launch_info({}).source == "single" and launch_info({}).world_size == 1


@pytest.mark.parametrize("change, words", [
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 outside SLURM_NTASKS=8"),
    ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight' is not an integer"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID"),
    ({"SLURM_NODELIST": None}, "SLURM_NODELIST"),
])
def test_bad_slurm_environment_is_one_user_error(change, words):
    env = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        launch_info(env)


def test_setup_under_plain_srun_gives_the_distenv(monkeypatch):
    """SLURM variables only → DistEnv fields, torchrun's variables for the process group, gloo on CPU."""
    from rest_fast.train import distributed

    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    environ.update(SLURM)
    monkeypatch.setattr(os, "environ", environ)
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    env = distributed.setup("cpu", timeout_s=60)
    assert (env.rank, env.world_size, env.local_rank, env.device) == (5, 8, 1, torch.device("cpu"))
    assert env.distributed and not env.is_main
    assert len(calls) == 1 and calls[0]["backend"] == "gloo"
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"], environ["LOCAL_WORLD_SIZE"]) == \
        ("5", "8", "1", "2")
    assert environ["MASTER_ADDR"] == "gpu03" and environ["MASTER_PORT"] == str(15000 + 4242017 % 20000)


# ------------------------------------------------------------------------------------------ end to end (slow)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    env.update(TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    return env


def _args(out: str) -> list[str]:
    from test_train_e2e import SMALL

    # eval batches of 6 = one batch per rank's block of 6 videos (see test_torchrun_two_processes_gloo)
    return ["-m", "rest_fast", "train", f"--out={out}", *SMALL, "epochs=1", "eval_batch_size=6"]


def _result(run: Path) -> dict:
    from safetensors.torch import load_file

    from rest_fast.run.rundir import read_jsonl

    return {
        "captions": [(run / "captions" / n).read_text() for n in ("initial.jsonl", "round_00.jsonl", "round_01.jsonl")],
        "weights": load_file(str(run / "checkpoints" / "epoch_0001" / "model.safetensors")),
        "losses": [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "epoch"],
        "world": [r["world_size"] for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "start"],
    }


def _same(a: dict, b: dict) -> None:
    assert a["captions"] == b["captions"]
    assert a["losses"] == b["losses"] and a["world"] == b["world"] == [2]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


@pytest.fixture(scope="module")
def two_ranks_one_agent(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("one_agent") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *_args(str(run))]
    p = subprocess.run(cmd, env=_base_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    return _result(run)


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_node_with_two_ranks(tmp_path, two_ranks_one_agent):
    run = tmp_path / "run"
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "rest-fast-test",
         *_args(str(run))], env=_base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [a.communicate(timeout=900) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-3000:] for o in outs]
    _same(_result(run), two_ranks_one_agent)


def _srun_tasks(cwds: list[Path], out: str, extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start one plain process per task with only SLURM's variables, as `srun` would (one node: localhost)."""
    job_id = _free_port() - 15000  # the port every task derives from the job id
    assert job_id >= 0
    procs = []
    for rank, cwd in enumerate(cwds):
        env = {**_base_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(len(cwds)), "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": str(len(cwds)), "SLURM_NODELIST": "localhost",
               "SLURM_JOB_ID": str(job_id), **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, *_args(out)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.slow
def test_plain_srun_tasks_train_like_torchrun(tmp_path, two_ranks_one_agent):
    done = _srun_tasks([tmp_path, tmp_path], str(tmp_path / "run"))
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-3000:] for p in done]
    _same(_result(tmp_path / "run"), two_ranks_one_agent)


@pytest.mark.slow
def test_out_not_shared_by_all_ranks_is_refused(tmp_path):
    """Each rank's `--out runs/x` is relative to its own folder, as a node-local disk would be: one line, exit 2,
    and rank 0's fresh folder is not left behind."""
    a, b = tmp_path / "node_a", tmp_path / "node_b"
    a.mkdir()
    b.mkdir()
    done = _srun_tasks([a, b], "runs/x", {"REST_FAST_SHARED_FS_WAIT_S": "1"})
    for p in done:
        assert p.returncode == 2, p.stderr[-3000:]
        lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert "not one folder for all ranks: rank 1" in lines[0] and "shared filesystem" in lines[0]
    assert not (a / "runs" / "x").exists() and not (b / "runs" / "x").exists()


def _check_in_child(rank: int, store: str, folders: list[str], results: str) -> None:
    """A forked 'rank' of a 2-process gloo group running the shared-folder check on its own view."""
    import torch.distributed as dist

    from rest_fast.run.shared_fs import check_shared_folder

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_shared_folder(folders[rank], rank, 2)
        msg = "ok"
    except UserError as exc:
        msg = f"UserError: {exc}"
    finally:
        dist.destroy_process_group()
    Path(results, f"rank{rank}.txt").write_text(msg)


@pytest.mark.parametrize("shared", [True, False])
def test_shared_folder_check_two_gloo_ranks(tmp_path, monkeypatch, shared):
    import multiprocessing

    monkeypatch.setenv("REST_FAST_SHARED_FS_WAIT_S", "0.5")
    a, b = tmp_path / "node_a" / "run", tmp_path / "node_b" / "run"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    folders = [str(a), str(a if shared else b)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_check_in_child, args=(r, str(tmp_path / "store"), folders, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if shared:
        assert msgs == ["ok", "ok"]
    else:  # both ranks refuse, in one line naming the blind rank and the fix
        for m in msgs:
            assert m.startswith("UserError: --out") and "\n" not in m
            assert "rank 1 on" in m and str(b) in m and str(a) in m and "shared filesystem" in m
    assert list(a.iterdir()) == [] and list(b.iterdir()) == []  # the check file is gone
