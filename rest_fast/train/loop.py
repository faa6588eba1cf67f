"""Algorithm 1 of the paper: REtrieve & Self-Train, as one resumable loop.

.. code-block:: text

    W̃_i   ← BLIP captions of each of the T frames of video i with each of the P prompts   (initial_captions)
    v_i   ← frozen-CLIP video feature of video i (mean over frames, L2-normalised)        (video_features)
    Ω_i   ← the H nearest videos of i by v (self excluded)                                (neighbour_graph)
    W̃_i   ← top-K distinct of W̃_i ∪ Ω_i by ⟨v_i, t_c⟩                                      (retrieval_update, round 0)
    repeat until `epochs` epochs:
        R epochs of the captioning loss on one caption sampled from W̃_i per video     (self_train_epoch)
        w̃_i,new ← beam-search caption of video i                                      (generate_captions)
        W̃_i   ← top-K distinct of W̃_i ∪ {w̃_i,new} ∪ Ω_i                                 (caption_round)

Resumability: after every epoch a checkpoint (weights, optimiser, scheduler, RNG, counters) is
written and ``state.json`` is replaced to point at it; after every round the caption cache, its
caption features and ``captions/round_XX.jsonl`` are written and ``state.json`` records the round.
Every random draw derives from (seed, epoch, step), so a resumed run repeats exactly what the lost
epoch would have done. ``kill -9`` loses at most the epoch (or round) in progress.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rest_fast.errors import UserError
from rest_fast.run.config import TrainConfig, identity_differences, load_run_config
from rest_fast.run.rundir import (
    CONFIG_FILE,
    CheckpointCorrupt,
    RunDir,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    capture_rng,
    restore_rng,
    verify_checkpoint,
)
from rest_fast.run.shared_fs import check_shared_folder
from rest_fast.run.sinks import MetricsLog, check_available
from rest_fast.train import distributed as dist_utils
from rest_fast.train.distributed import DistEnv, barrier, broadcast_object
from rest_fast.train.preempt import Preempted, drop_mid_epoch_checkpoints, is_mid_epoch
from rest_fast.train.self_train import derive_seed
from rest_fast.train.sharded_round import (
    clip_tam_sharded,
    read_initial_block,
    write_jsonl_by_rank,
    write_round_captions,
)
from rest_fast.train.training_state import TrainingStateMixin


class RunExistsError(RuntimeError):
    pass


def log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def _progress(cfg: TrainConfig, env: DistEnv, desc: str, total: int | None = None):
    """A tqdm wrapper (rank 0 only, with ETA) or the identity."""
    if not (cfg.progress and env.is_main):
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, total=total if total is not None else _len(it), leave=False,
                           dynamic_ncols=True, file=sys.stderr)


def _len(it):
    try:
        return len(it)
    except TypeError:
        return None


# ----------------------------------------------------------------------------------------------------
# run directory and resume resolution
# ----------------------------------------------------------------------------------------------------


def run_root(cfg: TrainConfig, resume: str | None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder named by ``--resume PATH`` or None) — reads nothing inside the run."""
    if resume in (None, "", "none", "auto"):
        return Path(cfg.out), None
    p = Path(resume)
    if (p / "meta.json").exists() and p.parent.name == "checkpoints":
        return p.parent.parent, p
    if (p / "state.json").exists() or (p / CONFIG_FILE).is_file():
        return p, None
    raise FileNotFoundError(f"--resume {resume}: neither a run directory (config.yaml) nor a checkpoint folder")


def resolve_run(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, Path, dict | None, Path | None]:
    """(config, run dir, state to resume from or None, checkpoint to load or None).

    ``resume=None``: a new run; an existing run at ``cfg.out`` is an error (never overwritten).
    ``resume="auto"``: continue the run at ``cfg.out`` from its last complete epoch, or start it.
    ``resume=PATH``: a run directory, or one of its ``checkpoints/epoch_XXXX`` folders to go back to.
    On resume the run's saved config is used; a changed non-runtime key is an error (``epochs`` may grow).
    The latest checkpoint is checked (checksums): a corrupt or missing one is skipped, with a warning, for
    the newest intact one; an explicitly named checkpoint that is corrupt is an error.
    """
    from rest_fast.train.recover import saved_config_conflict, state_from_checkpoints

    root, ckpt = run_root(cfg, resume)
    if resume in (None, "", "none"):
        if (root / "state.json").exists():
            raise RunExistsError(f"{root} already holds a run: pass --resume auto to continue it, or another --out")
        conflict = saved_config_conflict(root, cfg)  # a stopped run's folder: only the same run may start there
        if conflict is not None:
            raise RunExistsError(conflict)
    run = RunDir(root, writable=False)
    state = run.read_state()
    if state is None and not run.config_path.is_file():
        return cfg, root, None, None
    saved = load_run_config(run.config_path)
    diffs = identity_differences(saved, cfg)
    if diffs:
        raise ValueError("the run at {} was made with another config; differing keys:\n  {}".format(root, "\n  ".join(diffs)))
    # runtime keys (workers, device, progress...) and a larger `epochs` come from now
    cfg = cfg.replace(out=str(root))
    if state is None:  # stopped before its first state.json, or the file was lost: continue what it holds
        state = state_from_checkpoints(run)
        if state is None:
            print(f"note: {root} has no state.json yet: round 0 restarts from what the run saved", flush=True)
            return cfg, root, None, None
        print(f"note: {root} has no state.json: continuing from {state['checkpoint']} (epoch {state['epoch']}, "
              f"round {state['round']})", flush=True)
    if ckpt is not None:
        problem = verify_checkpoint(ckpt)
        if problem is not None:
            raise CheckpointCorrupt(f"--resume {resume}: {problem}; pick another checkpoints/epoch_XXXX folder")
    elif state.get("checkpoint"):
        ckpt = run.inside(state["checkpoint"], "state.json 'checkpoint'")
        problem = verify_checkpoint(ckpt)
        if problem is not None:
            before = _epoch_of_name(ckpt.name)
            if before is not None and is_mid_epoch(ckpt):  # its epoch's own checkpoint is older: a fallback
                before += 1
            fallback, skipped = run.newest_intact_checkpoint(before=before)
            where = f"{fallback.name}" if fallback is not None else "the start of self-training (round 0)"
            msg = f"latest checkpoint unusable ({'; '.join([problem, *skipped])}); resuming from {where}"
            warnings.warn(msg, stacklevel=2)
            print(f"warning: {msg}", flush=True)
            ckpt = fallback
            if ckpt is None:
                # no intact weights: self-training restarts after round 0 (kept if its files are there)
                has_round0 = run.saved_cache(0) is not None and (any(
                    run.path("features", f).is_file() for f in (_caption_rows_name(0), "captions_00.npy")) or any(
                    run.path("features").glob("caption_rows_00.rank000_of*.npy")))
                state = {**state, "epoch": 0, "round": 0, "checkpoint": None} if has_round0 else None
                return cfg, root, state, None
    if ckpt is not None:
        meta = json.loads((ckpt / "meta.json").read_text())
        if ckpt != root / str(state.get("checkpoint")):
            # going back to an older checkpoint: the round state is the one saved with it
            state = {**state, "epoch": meta["epoch"], "round": meta["round"], "checkpoint": str(ckpt.relative_to(root))}
        # a mid-epoch checkpoint: the steps of the epoch under way up to it are kept (see _truncate_run)
        state = {**state, "mid_epoch_step": meta.get("step") if is_mid_epoch(ckpt) else None}
    return cfg, root, state, ckpt


def _gather_distinct_rows(env: DistEnv, own: np.ndarray) -> np.ndarray:
    """Every rank's rows of distinct ids (``retrieval_update.distinct_rows``), padded with -1 to the widest rank's,
    joined in rank order: int32 ``[N, W]`` on every rank."""
    from rest_fast.train.retrieval_update import distinct_rows

    rows = distinct_rows(own)
    width = torch.tensor([rows.shape[1]], dtype=torch.int64)
    if env.distributed:
        import torch.distributed as dist

        t = width.to(env.device) if env.device.type == "cuda" else width
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        width = t.cpu()
    padded = np.full((rows.shape[0], int(width)), -1, dtype=np.int32)
    padded[:, : rows.shape[1]] = rows
    t = torch.from_numpy(padded)
    return dist_utils.gather_rows(env, t.to(env.device) if env.device.type == "cuda" else t).cpu().numpy()


_CACHE_FILE = re.compile(r"^round_(\d{2,})\.(rfcc|sharded\.json|rank\d{3}_of\d{3}\.(npz|texts\.rfcc|dict\.rfcc))$")


def _round_of_cache_file(name: str) -> int | None:
    """The round of a caption-cache file this trainer writes (None for any other name: never ours to delete)."""
    m = _CACHE_FILE.match(name)
    return int(m.group(1)) if m else None


def _epoch_of_name(name: str) -> int | None:
    try:
        return int(name.split("_")[1])
    except (IndexError, ValueError):
        return None


def _too_many_bad(bad: int, total: int, threshold: float, examples: list[str], run: Path) -> str:
    shown = ", ".join(examples[:3]) + (" ..." if len(examples) > 3 else "")
    return (f"{bad} of {total} videos cannot be read (> bad_files_threshold={threshold}): {shown}; see "
            f"{run / 'bad_files.tsv'}; fix the files or raise bad_files_threshold (allowed on --resume)")


def _video_names(index, data: str | None = None, data_root: str | None = None) -> list[str]:
    """The ordered video list as the run records it: paths relative to where ``data`` says the videos live
    (the class-folder root, the list's root, a prepared set's source root), so a dataset moved as a whole
    still matches; missing files of a list included."""
    import os

    paths = [os.path.abspath(p) for p in list(index.paths) + list(index.missing)]
    if not paths:
        return []
    root = getattr(index, "info", {}).get("source_root") if hasattr(index, "info") else None
    if root is None and data is not None:
        p = Path(data)
        root = str(p) if p.is_dir() else (data_root if data_root is not None else str(p.parent))
    if root is None:
        common = os.path.commonpath(paths)
        root = common if os.path.isdir(common) else os.path.dirname(common)
    root = os.path.abspath(root)
    return [os.path.relpath(p, root) for p in paths]


def _truncate_run(run: RunDir, epoch: int, rnd: int, mid_epoch_step: int | None = None) -> None:
    """Drop what a lost epoch/round left behind: later metrics, round files and checkpoints. ``mid_epoch_step``:
    resuming from a mid-epoch checkpoint taken at this global step (the epoch's step records up to it stay)."""

    def keep(rec: dict) -> bool:
        kind = rec.get("kind")
        if kind == "step" and mid_epoch_step is not None and int(rec.get("epoch", 0)) == epoch + 1:
            return int(rec.get("step", 0)) <= mid_epoch_step
        if kind in ("step", "epoch"):
            return int(rec.get("epoch", 0)) <= epoch
        if kind == "round":
            return int(rec.get("round", 0)) <= rnd
        return True

    run.filter_metrics(keep)
    for p in run.path("captions").glob("round_*.jsonl"):
        if int(p.stem.split("_")[1]) > rnd:
            p.unlink()
    for p in run.path("cache").glob("round_*"):
        r_of = _round_of_cache_file(p.name)
        if r_of is not None and r_of > rnd:
            p.unlink()
    for p in run.list_checkpoints():
        if int(p.name.split("_")[1]) > epoch:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------


class Trainer(TrainingStateMixin):
    """Holds the pieces of one run; :meth:`run` executes Algorithm 1 from wherever the run stands."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, *, resume: str | None = None) -> None:
        self.env = env
        # rank 0 resolves the run (it owns the files); the others follow its decision
        decision = None
        error = None
        self._lock: RunLock | None = None
        if env.is_main:
            try:
                root, _ = run_root(cfg, resume)
                if resume in (None, "", "none") and (root / "state.json").exists():
                    raise RunExistsError(f"{root} already holds a run: pass --resume auto to continue it, or another --out")
                RunDir.claim(root)  # new, empty or ours: never write into (or delete from) a foreign folder
                self._lock = RunLock(root).acquire()  # one trainer per run folder
                decision = resolve_run(cfg, resume)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
                self.close()
        error = broadcast_object(env, error)
        if error is not None:
            raise error
        decision = broadcast_object(env, decision)
        self.cfg, root, self.state, self.ckpt = decision
        self.run_dir = RunDir(root, writable=env.is_main)
        try:  # several nodes: every rank must see rank 0's run folder (shared filesystem), else one line
            check_shared_folder(root, env.rank, env.world_size)
        except Exception:
            self.close()
            raise
        if self.state is not None and self.state.pop("recovered", False) and env.is_main:
            self.run_dir.write_state(self.state)  # rebuilt from a checkpoint (state.json was missing): record it
        barrier(env)

    def close(self) -> None:
        """Close the metric sinks and release the run folder's lock (rank 0)."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- setup ---------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        cfg, env = self.cfg, self.env
        if env.is_main:
            if self.state is None:
                atomic_write_text(self.run_dir.path(CONFIG_FILE), cfg.to_yaml())
                if self.run_dir.metrics_path.exists():  # a run that died before its first state: start the log
                    atomic_write_text(self.run_dir.metrics_path, "")  # afresh, replaced (never absent to a reader)
            else:
                atomic_write_text(self.run_dir.path(CONFIG_FILE), cfg.to_yaml())  # may carry a larger `epochs`
                _truncate_run(self.run_dir, int(self.state["epoch"]), int(self.state["round"]),
                              self.state.get("mid_epoch_step"))
            self.metrics = MetricsLog.open(self.run_dir, cfg.log_to, config=cfg.to_dict())  # metrics.jsonl + log_to
            self.metrics.write({"kind": "start", "resume_epoch": self.state["epoch"] if self.state else None,
                                "world_size": env.world_size, "device": str(env.device)})
        barrier(env)

    def _prepare_demo(self) -> None:
        """Synthesise the demo clips inside the run dir (rank 0, once; kept for a resume)."""
        from rest_fast.train import demo

        cfg, env = self.cfg, self.env
        log(env, demo.demo_notice(cfg.blip))
        data_dir = self.run_dir.path("demo", "clips")
        if env.is_main:
            demo.prepare_demo_data(data_dir, blip=cfg.blip, videos_per_class=cfg.demo_videos_per_class,
                                   frames=cfg.demo_frames, size=cfg.demo_resolution, seed=cfg.seed)
        barrier(env)
        self.data_source = str(data_dir)

    def setup(self) -> None:
        from rest_fast.train import inputs

        cfg, env = self.cfg, self.env
        self._prepare_run_dir()
        self.data_source, self.blip_source = cfg.data, cfg.blip
        if cfg.is_demo:
            self._prepare_demo()
        if cfg.blip == inputs.TINY:  # random-init tiny BLIP, written into the run dir so a resume reloads it
            self.blip_source = str(inputs.ensure_tiny_blip(self.run_dir.path("models", "tiny_blip"), cfg, env))
        elif cfg.blip == inputs.DEMO:  # the pretrained demo BLIP shipped with the package
            from rest_fast.synthetic.models import demo_blip_dir

            self.blip_source = str(demo_blip_dir())
        index = inputs.build_index(self.data_source, cfg.data_root)
        self._check_run_inputs(index)
        self.n = len(index)
        if self.n < 2:
            missing = f" ({len(index.missing)} listed files are missing, e.g. {index.missing[0]})" if index.missing else ""
            raise UserError(f"REST needs at least 2 videos, {self.data_source} holds {self.n}{missing}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said below, once, on rank 0
            from rest_fast.retrieval import cap_neighbours

            self.h = cap_neighbours(cfg.num_neighbours, self.n, exclude_self=not cfg.neighbours_include_self)
        if self.h < cfg.num_neighbours:
            cap = "N" if cfg.neighbours_include_self else "N-1"
            msg = f"num_neighbours H={cfg.num_neighbours} capped at {cap}={self.h} (only {self.n} videos)"
            if env.is_main:  # once (the CLI prints a warning as one line)
                warnings.warn(msg, stacklevel=2)
        # new parameters (fresh temporal adapters) draw from torch's RNG: the same seed on every rank gives
        # every rank, and a re-run, the same initial weights
        torch.manual_seed(derive_seed(cfg.seed, 11))
        self.model, self.clip = inputs.load_models(self.blip_source, cfg.clip, cfg, env)
        self.inputs = inputs.Inputs(index, cfg, env, blip_source=self.blip_source, clip=self.clip)
        if self.inputs.labels is None:
            log(env, "note: the videos have no labels: self-training needs none; CLIP-TAM accuracy is skipped")
        elif (unlabelled := sum(1 for y in self.inputs.labels if y < 0)):
            log(env, f"note: {unlabelled} of {self.n} videos are unlabelled: CLIP-TAM accuracy is over the "
                     f"{self.n - unlabelled} labelled ones")
        log(env, f"REST: {self.n} videos, T={cfg.num_frames}, S={cfg.image_size}, K={cfg.k}, H={self.h}, "
                 f"R={cfg.epochs_per_round}, {cfg.epochs} epochs ({cfg.caption_rounds} rounds), world size {env.world_size}, "
                 f"device {env.device}; run dir {self.run_dir.root}")

    def _check_run_inputs(self, index) -> None:
        """Right after indexing: the video list is the run's (on resume), and the files already known to be
        unreadable (missing files, those an earlier attempt recorded) are within ``bad_files_threshold``."""
        from rest_fast.data.bad_files import TooManyBadFiles

        cfg, env = self.cfg, self.env
        self._earlier_bad: dict[str, str] = {}
        error = None
        if env.is_main:
            try:
                names = _video_names(index, self.data_source, cfg.data_root)
                # a new run records its list; a run that stopped before its first state checks the list it
                # recorded (check_videos records only when no list is there yet)
                self.run_dir.check_videos(names, record=False)
                known = set(index.paths) | set(index.missing)
                prev = self.run_dir.path("bad_files.json")
                if prev.is_file():  # features read from the cache decode nothing: keep what was found before
                    try:
                        rows = json.loads(prev.read_text())
                        self._earlier_bad = {r["path"]: r["reason"] for r in rows if r.get("path") in known}
                    except (ValueError, TypeError, KeyError, AttributeError):
                        self._earlier_bad = {}
                bad = set(index.missing) | set(self._earlier_bad)
                total = len(index.paths) + len(index.missing)
                if total and len(bad) > cfg.bad_files_threshold * total:
                    raise TooManyBadFiles(_too_many_bad(len(bad), total, cfg.bad_files_threshold,
                                                        sorted(bad), self.run_dir.root))
            except (ValueError, TooManyBadFiles) as exc:
                error = exc
        error = broadcast_object(env, error)
        if error is not None:
            raise error

    def _check_bad_files(self) -> None:
        """After the features pass (every video decoded once, or its features cached): stop now, not hours
        later, when more than ``bad_files_threshold`` of the videos are unreadable."""
        from rest_fast.data.bad_files import TooManyBadFiles
        from rest_fast.train.distributed import all_gather_objects

        cfg, env = self.cfg, self.env
        for path, reason in getattr(self, "_earlier_bad", {}).items():
            if path not in self.inputs.bad_files:
                self.inputs.bad_files.add(path, reason)
        parts = all_gather_objects(env, [p for p, _, _ in self.inputs.bad_files.rows()])
        bad = sorted({p for rows in parts for p in rows})
        total = self.n + len(self.inputs.index.missing)
        self._record_bad_files()
        if total and len(bad) > cfg.bad_files_threshold * total:
            raise TooManyBadFiles(_too_many_bad(len(bad), total, cfg.bad_files_threshold, bad, self.run_dir.root))

    # --- Algorithm 1 steps ---------------------------------------------------------------------------
    def compute_features_and_neighbours(self) -> None:
        from rest_fast.train.features import CaptionFeatures, features_key, video_features
        from rest_fast.train.neighbours import neighbour_graph

        cfg, env = self.cfg, self.env
        t0 = time.time()
        key = features_key(videos=[str(p) for p in self.inputs.paths], clip=cfg.clip, seed=cfg.seed,
                           pretrained=cfg.clip_pretrained, T=cfg.num_frames, size=self.inputs.clip_size)
        clip, batches = self._video_feature_source(key)  # computed in resumable chunks unless cached
        # under torchrun this rank's block of rows only, [hi-lo, D] (issue 20, item 5); all N in one process
        block = env.block(self.n) if env.distributed else None
        self.video_feats = video_features(
            clip, batches, self.n, env, cache_dir=self.run_dir.path("features"),
            key=key, amp=cfg.precision, progress=_progress(cfg, env, "CLIP video features", self.inputs.eval_steps()),
            rows=block)
        self._drop_video_parts()
        # docs/PRECISION: the trainer's CLIP features are L2-normalised, then rounded to fp16 once (fp32 scores)
        self.video_feats = self.video_feats.to(torch.float16)
        # this rank's rows of the graph only (all rows in one process)
        self.neighbours = neighbour_graph(self.video_feats, self.h, env, cache_dir=self.run_dir.path("features"),
                                          include_self=cfg.neighbours_include_self,
                                          num_videos=self.n if env.distributed else None)
        # sharded by caption id under torchrun: no rank holds the whole table (issue 20, item 2)
        self.text_feats = CaptionFeatures(self.video_feats.shape[1], env.device, dtype=torch.float16, rank=env.rank,
                                          world_size=env.world_size)
        self._check_bad_files()
        log(env, f"features: {self.n} videos x {self.video_feats.shape[1]} dims, neighbour graph H={self.h} "
                 f"({time.time() - t0:.1f} s)")

    def round_zero(self) -> None:
        """Initial captions (T x P per video) and the first retrieval update; snapshot round 0."""
        from rest_fast.cache import CaptionCache
        from rest_fast.train import round0_chunks
        from rest_fast.train.generate_round import caption_round

        cfg, env = self.cfg, self.env
        t0 = time.time()
        from rest_fast.train.features import features_key

        path = self.run_dir.path("captions", "initial.jsonl")
        meta = self.run_dir.path("captions", "initial.json")
        # reused only when made from the same videos, captioner and decoding settings (a run that died early)
        key = features_key(videos=[str(p) for p in self.inputs.paths], blip=cfg.blip, prompts=list(cfg.prompts),
                           train_prompt=cfg.train_prompt, T=cfg.num_frames, S=cfg.image_size, seed=cfg.seed,
                           beams=cfg.num_beams, max_length=cfg.max_length, min_length=cfg.min_length,
                           adapters=cfg.adapter_layers)
        m = len(cfg.prompts) * cfg.num_frames
        # under torchrun each rank keeps the initial captions of its own block of videos only (issue 20)
        lo, hi = env.block(self.n)
        initial = None
        reuse = env.is_main and path.exists() and meta.exists() and json.loads(meta.read_text()).get("key") == key
        if broadcast_object(env, reuse):
            block, count = read_initial_block(path, self.n, lo, hi, per_video=m)
            ok = count == self.n and len(block) == hi - lo
            if dist_utils.all_reduce_sum(env, torch.tensor([0 if ok else 1])).item() == 0:
                initial = block
        if initial is None:  # in chunks: a kill loses at most one, a stop signal none (rest_fast.train.round0_chunks)
            parts = round0_chunks.parts_dir(self.run_dir.root)
            initial = round0_chunks.chunked_initial_captions(
                self.model, lambda start: self.inputs.eval_batches("blip", start=start), self.n, env, folder=parts,
                key=key, batch_size=cfg.eval_batch_size, control=self.control, signals=self.signals,
                run_root=self.run_dir.root, progress=_progress(cfg, env, "initial captions", self.inputs.eval_steps()),
                gather=False, prompts=list(cfg.prompts), train_prompt=cfg.train_prompt, num_beams=cfg.num_beams,
                max_length=cfg.max_length, min_length=cfg.min_length, amp=cfg.precision)
            write_jsonl_by_rank(path, ({"video": str(self.inputs.rel(lo + j)), "captions": c}
                                       for j, c in enumerate(initial)), env)
            if env.is_main:
                atomic_write_json(meta, {"key": key, "num_videos": self.n})
            round0_chunks.drop_parts(parts, env)
        flat = [c for caps in initial for c in caps]
        if env.distributed:  # strings sharded over the ranks; ids as in one process (rest_fast.cache.sharded)
            from rest_fast.cache.sharded import ShardedCaptionCache

            self.cache = ShardedCaptionCache(self.n, cfg.k, group=dist_utils.cpu_group(env))  # host-side exchanges
            own = self.cache.intern(flat, np.arange(lo * m, hi * m), self.n * m).astype(np.int32).reshape(hi - lo, m)
            # round 0 only: every video's distinct initial ids (int32 [N, M'], M' <= T x P, -1 padded), for the
            # neighbours' candidates; de-duplicated before they are shared (frames of a clip repeat captions)
            initial_ids = _gather_distinct_rows(env, own)
        else:
            self.cache = CaptionCache(self.n, cfg.k)
            initial_ids = np.asarray(self.cache.intern(flat), dtype=np.int32).reshape(self.n, m)
        del flat, initial
        self._plan_caption_table(0)
        stats = caption_round(0, None, self.cache, self.text_feats, self.clip, self.video_feats, self.neighbours, cfg.k,
                              env, batch_size=cfg.eval_batch_size, amp=cfg.precision, initial_ids=initial_ids,
                              progress=_progress(cfg, env, "embed captions"),
                              rerank_progress=_progress(cfg, env, "re-rank"))
        stats["new_captions"] = len(self.cache)  # every initial caption is new
        stats["initial_captions"] = int(self.n * m)
        stats["initial_distinct"] = int(np.unique(initial_ids[initial_ids >= 0]).size)
        self._finish_round(0, stats, generated=None, seconds=time.time() - t0, epoch=0)

    def caption_round(self, r: int, epoch: int) -> None:
        from rest_fast.train.generate_round import caption_round, generate_captions

        cfg, env = self.cfg, self.env
        t0 = time.time()
        # under torchrun each rank keeps its own block's captions (the cache is sharded; nothing is gathered)
        generated = generate_captions(self.model, self.inputs.eval_batches("blip"), env, prompt=cfg.train_prompt,
                                      num_beams=cfg.num_beams, max_length=cfg.max_length, min_length=cfg.min_length,
                                      amp=cfg.precision, progress=_progress(cfg, env, f"round {r} captions", self.inputs.eval_steps()),
                                      gather=not env.distributed)
        stats = caption_round(r, generated, self.cache, self.text_feats, self.clip, self.video_feats, self.neighbours,
                              cfg.k, env, batch_size=cfg.eval_batch_size, amp=cfg.precision,
                              progress=_progress(cfg, env, "embed captions"), rerank_progress=_progress(cfg, env, "re-rank"))
        self._finish_round(r, stats, generated=generated, seconds=time.time() - t0, epoch=epoch)

    def _plan_caption_table(self, r: int) -> None:
        """Allocate the caption-feature table once for the rest of the run, after round ``r``'s cache exists: its
        captions plus at most N new ones per caption round still to come (a growth would copy the table, 2× its
        memory for a moment, and a run too big for its last round would fail only then)."""
        later = max(0, self.cfg.caption_rounds - r)
        self.text_feats.plan_capacity(len(self.cache) + later * self.n)

    def _finish_round(self, r: int, stats: dict, *, generated: list[str] | None, seconds: float, epoch: int) -> None:
        """Persist round ``r`` (cache, caption features, captions file, metrics), then the state."""
        cfg, env = self.cfg, self.env
        tam = self._clip_tam(generated)
        # this round's rows only; under torchrun each rank writes its own shard
        self.text_feats.save_new(self.run_dir.path("features", _caption_rows_name(r, env.rank, env.world_size)))
        if self._sharded_cache:  # every rank writes its part (rest_fast.train.sharded_round)
            self.cache.save(self.run_dir.path("cache"), r)
        # one process: a plain streamed write; torchrun (sharded cache): per-rank parts joined by rank 0
        sample = write_round_captions(self.run_dir.captions_path(r), self.cache, env, rel=self.inputs.rel,
                                      generated=generated, labels=self.inputs.labels,
                                      class_names=self.inputs.class_names)
        if env.is_main:
            if not self._sharded_cache:
                self.cache.save(str(self.run_dir.cache_path(r)))
            record = {"kind": "round", "round": r, "epoch": epoch, "seconds": round(seconds, 3), **stats, **tam}
            self.metrics.write(record)
            self.metrics.captions(r, sample)  # a table of sample captions on the dashboards
            prev = self.run_dir.read_state() or {}
            self.run_dir.write_state({"epoch": epoch, "round": r, "checkpoint": prev.get("checkpoint"),
                                      "cache": str(self.run_dir.saved_cache(r).relative_to(self.run_dir.root)),
                                      "caption_features": f"features/{_caption_rows_name(r, 0, env.world_size)}",
                                      "world_size": env.world_size})
            acc = "".join(f", {name} {tam[key]:.1%}" for key, name in (
                ("tam_top1", "CLIP-TAM top-1 generated"), ("tam_pseudo_top1", "pseudo"),
                ("tam_initial_top1", "frame captioner")) if key in tam)
            print(f"round {r}/{cfg.caption_rounds} (after epoch {epoch}): {stats['distinct_captions']} distinct captions in "
                  f"slots, mean video-text score {stats['mean_score']:.4f}, {stats['new_captions']} new / "
                  f"{stats['cache_size']} captions in cache"
                  f"{acc}{_sent(stats)} [{seconds:.1f} s]", flush=True)
        barrier(env)

    def _clip_tam(self, generated: list[str] | None) -> dict:
        """CLIP-TAM accuracy of the round's captions when labels exist (generated ones; else the top slot).

        Every caption scored here is already in the cache and its CLIP text feature in ``text_feats`` (embedded
        sharded over the ranks this round), so rank 0 only looks rows up and takes one [N, D] × [D, classes]
        product: no re-encoding of 2N captions on one rank while the others wait.
        """
        if self.inputs.labels is None or not (self.env.is_main or self.env.distributed):
            return {}
        from rest_fast.run.clip_tam import embed_classes, nearest_classes

        if self._sharded_cache:
            return self._clip_tam_sharded(generated)

        # only the labelled videos count (a folder may mix class sub-folders with loose, unlabelled videos)
        have = np.flatnonzero(np.asarray(self.inputs.labels) >= 0)
        if have.size == 0:
            return {}
        if getattr(self, "_class_emb", None) is None:
            self._class_emb = embed_classes(self.inputs.class_names, self.clip)
        ids, _ = self.cache.get(have.astype(np.int64))
        top = ids[:, 0].astype(np.int64)

        def ids_of(texts: list[str] | None) -> np.ndarray | None:
            """Caption ids of ``texts`` for the labelled videos: every one was interned (and embedded) already."""
            if texts is None:
                return None
            before = len(self.cache)
            out = np.asarray(self.cache.intern([texts[i] for i in have]), dtype=np.int64)
            if len(self.cache) != before:
                raise RuntimeError("a caption scored by CLIP-TAM was missing from the cache")
            return out

        gen = ids_of(generated)
        initial = ids_of(self._initial_middle_captions())
        labels = np.asarray(self.inputs.labels)[have]
        out = {"tam_videos": int(have.size)}
        topk = min(5, len(self.inputs.class_names))
        tf = self.text_feats
        P = tf.world_size
        for name, rows in (("tam", gen), ("tam_pseudo", top), ("tam_initial", initial)):
            if rows is None:
                continue
            # each rank scores the captions whose features it holds (id mod P), rank 0 the videos without one;
            # the correct counts are summed (issue 20, item 5): no rank gathers captions or features
            sel = np.flatnonzero(np.where(rows >= 0, rows % P == tf.rank, tf.rank == 0))
            dev = tf.device
            feats = tf.feats[torch.from_numpy(np.maximum(rows[sel], 0) // P).to(dev)].float()
            if (rows[sel] < 0).any():  # a video without a caption is scored as the empty caption, as before
                feats[torch.from_numpy(rows[sel] < 0).to(dev)] = self.clip.encode_text([""]).float().to(dev)
            pred, _ = nearest_classes(feats, self._class_emb.to(dev), topk)
            pred = pred.cpu().numpy()
            hits = torch.tensor([int((pred[:, 0] == labels[sel]).sum()), int((pred == labels[sel, None]).any(axis=1).sum())],
                                dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
            hits = dist_utils.all_reduce_sum(self.env, hits).cpu()
            out[f"{name}_top1"] = float(hits[0]) / have.size
            out[f"{name}_top5"] = float(hits[1]) / have.size
        return out

    @property
    def _sharded_cache(self) -> bool:
        return hasattr(self.cache, "set_own")

    def _clip_tam_sharded(self, generated: list[str] | None) -> dict:
        """:meth:`_clip_tam` with a sharded cache: each rank takes its own block of videos; every caption scored
        here was interned (and embedded) already, so the look-ups add no id."""
        from rest_fast.run.clip_tam import embed_classes

        if getattr(self, "_class_emb", None) is None:
            self._class_emb = embed_classes(self.inputs.class_names, self.clip)
        c = self.cache
        lo, hi = c.lo, c.hi
        labels = np.asarray(self.inputs.labels)[lo:hi]

        def ids_of(texts: list[str] | None) -> np.ndarray | None:
            have = int(dist_utils.all_reduce_sum(self.env, torch.tensor([texts is not None])).item())
            if have != self.env.world_size:  # every rank has them, or none does
                return None
            before = len(c)
            out = c.intern(list(texts), np.arange(lo, hi), self.n)
            if len(c) != before:
                raise RuntimeError("a caption scored by CLIP-TAM was missing from the cache")
            return out

        if not hasattr(self, "_tam_initial_ids"):  # the frame captioner's ids never change: read and looked up once
            p, mid = len(self.cfg.prompts), self.cfg.num_frames // 2
            block, count = read_initial_block(self.run_dir.path("captions", "initial.jsonl"), self.n, lo, hi,
                                              per_video=p * self.cfg.num_frames)
            initial = [caps[mid * p] for caps in block] if count == self.n and len(block) == hi - lo else None
            self._tam_initial_ids = ids_of(initial)
        rows = {"tam": ids_of(generated), "tam_pseudo": c.slot_ids[lo:hi, 0].astype(np.int64),
                "tam_initial": self._tam_initial_ids}
        return clip_tam_sharded(c, self.text_feats, self.clip, self._class_emb, labels, rows, self.env)

    def _initial_middle_captions(self) -> list[str] | None:
        """The zero-shot frame captioner's caption of each video: its middle frame with the first prompt.

        Read from ``captions/initial.jsonl`` (frame-major, P prompts per frame), so a resumed run reports it too.
        """
        path = self.run_dir.path("captions", "initial.jsonl")
        if not path.exists():
            return None
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        p, mid = len(self.cfg.prompts), self.cfg.num_frames // 2
        if len(recs) != self.n or any(len(r["captions"]) != p * self.cfg.num_frames for r in recs):
            return None
        return [r["captions"][mid * p] for r in recs]

    def _record_bad_files(self) -> None:
        self.inputs.write_bad_files(self.run_dir.root)

    # --- self-training -------------------------------------------------------------------------------
    def setup_training(self) -> None:
        from rest_fast.train.self_train import CaptionLoss, build_optimizer, build_scheduler

        cfg, env = self.cfg, self.env
        self.steps_per_epoch = self.inputs.steps_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.loss_module = CaptionLoss(self.model, cfg.train_prompt, cfg.label_smoothing)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup_steps, cfg.lr, cfg.lr_min)
        self.global_step = 0
        self._setup_precision_and_preemption()
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_module = DDP(self.loss_module, **ddp_options(env, cfg.accum_steps))
        else:
            self.train_module = self.loss_module

    def load_checkpoint(self, path: Path) -> None:
        model_state, train_state, meta = RunDir.load_checkpoint(path)
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(train_state["optimizer"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        self.global_step = int(train_state["step"])
        rng = train_state.get("rng", {}).get(self.env.rank)
        if rng is not None:
            restore_rng(rng)
        self._load_step_state(train_state)

    def save_checkpoint(self, epoch: int, rnd: int) -> None:
        from rest_fast.train.distributed import all_gather_objects

        cfg, env = self.cfg, self.env
        rngs = all_gather_objects(env, capture_rng())
        if env.is_main:
            train_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                           "rng": dict(enumerate(rngs)), "step": self.global_step, "epoch": epoch, "round": rnd,
                           "scaler": self.scaler.state_dict()}
            ckpt = self.run_dir.save_checkpoint(epoch, self.model.state_dict(), train_state,
                                                {"round": rnd, "step": self.global_step, "world_size": env.world_size})
            prev = self.run_dir.read_state() or {}
            self.run_dir.write_state({**prev, "epoch": epoch, "round": rnd,
                                      "checkpoint": str(ckpt.relative_to(self.run_dir.root))})
            drop_mid_epoch_checkpoints(self.run_dir.list_checkpoints())  # superseded (state.json no longer names them)
            self.run_dir.prune_checkpoints(cfg.keep_checkpoints, protect=[ckpt])
        barrier(env)

    def train_epoch(self, epoch: int, rnd: int) -> dict:
        """Epoch ``epoch`` (0-based) of round ``rnd`` (1-based)."""
        from rest_fast.train.self_train import self_train_epoch

        cfg, env = self.cfg, self.env
        torch.manual_seed(derive_seed(cfg.seed, epoch, env.rank, 7))  # dropout draws of this epoch
        t0 = time.time()
        start_step, resume = self._take_mid_epoch_resume()  # (0, None) unless resuming mid-epoch
        base_step = self.global_step - start_step

        def on_log(rec: dict) -> None:
            if env.is_main:
                self.metrics.write({"kind": "step", "epoch": epoch + 1, "round": rnd,
                                    "step": base_step + rec["step_in_epoch"],
                                    **{k: v for k, v in rec.items() if k != "step_in_epoch"}})

        stats = self_train_epoch(self.train_module, self.optimizer, self.scheduler,
                                 self.inputs.train_batches(epoch, start_step=start_step),
                                 self.cache, epoch=epoch, seed=cfg.seed, env=env, amp=cfg.precision, grad_clip=cfg.grad_clip,
                                 log_every=cfg.log_every, on_log=on_log,
                                 progress=_progress(cfg, env, f"epoch {epoch + 1}/{cfg.epochs}",
                                                    self.steps_per_epoch - start_step),
                                 accum_steps=cfg.accum_steps, scaler=self.scaler, start_step=start_step, resume=resume,
                                 on_step_end=self._step_end_hook(epoch, rnd - 1, base_step))
        self.global_step += stats["steps"]
        if stats.get("stopped"):
            self._record_bad_files()
            raise Preempted(self.signals.signame, f"in epoch {epoch + 1} after step {self.global_step - base_step} "
                            f"(checkpoint {self._last_mid_epoch})", self.run_dir.root)
        self._record_bad_files()
        if env.is_main:
            self.metrics.write({"kind": "epoch", "epoch": epoch + 1, "round": rnd, "loss": stats["loss"],
                                "lr": self.optimizer.param_groups[0]["lr"], "step": self.global_step,
                                "seconds": round(time.time() - t0, 3), "clips_per_second": stats["clips_per_second"],
                                "data_wait_fraction": stats["data_wait_fraction"]})
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f}, {stats['clips_per_second']:.1f} clips/s "
                  f"per GPU, data wait {stats['data_wait_fraction']:.0%} [{time.time() - t0:.1f} s]", flush=True)
        return stats

    def _restore_round(self, rnd: int) -> None:
        from rest_fast.cache.sharded import load_any

        env = self.env
        # a sharded save, or a one-process file: under torchrun each rank takes its share, on any world size
        self.cache = load_any(self.run_dir.path("cache"), rnd, distributed=env.distributed,
                              group=dist_utils.cpu_group(env))
        self._plan_caption_table(rnd)  # the loads below allocate the run's final table once
        rows = [self.run_dir.path("features", _caption_rows_name(r, env.rank, env.world_size)) for r in range(rnd + 1)]
        legacy = self.run_dir.path("features", f"captions_{rnd:02d}.npy")
        old = _saved_world_size(self.run_dir.path("features"), rnd)
        if all(p.exists() for p in rows):
            self.text_feats.load_rows(rows, max_rows=len(self.cache))
        elif old is not None:  # saved by another world size: re-shard its files (issue 20, item 6)
            feats = self.run_dir.path("features")
            parts = [[feats / _caption_rows_name(t, r0, old) for r0 in range(old)] for t in range(rnd + 1)]
            counts = self.text_feats.load_resharded(parts, old, len(self.cache))
            self.text_feats.save_round_files(counts, lambda t: feats / _caption_rows_name(t, env.rank, env.world_size))
            log(env, f"caption features re-sharded from {old} to {env.world_size} ranks")
        elif env.distributed or not legacy.exists():
            pass  # nothing usable on disk: the update below embeds this rank's captions again
        else:  # a run made before round files held only their new rows: one full table per round
            self.text_feats.load(self.run_dir.path("features", f"captions_{rnd:02d}.npy"), max_rows=len(self.cache))
        self.text_feats.update(self.cache, self.clip, self.env, batch_size=self.cfg.eval_batch_size, amp=self.cfg.precision)

    # --- Algorithm 1 ---------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        t_start = self._last_report = time.time()
        if self.state is not None and int(self.state["epoch"]) >= cfg.epochs and int(self.state["round"]) >= cfg.caption_rounds:
            log(env, f"{self.run_dir.root} is already complete ({cfg.epochs} epochs, {cfg.caption_rounds} rounds); "
                     "raise `epochs` to train further")
            return self.run_dir.root
        self.setup()
        self.compute_features_and_neighbours()
        self.setup_training()
        if self.state is None:
            epoch, rnd = 0, -1
        else:
            epoch, rnd = int(self.state["epoch"]), int(self.state["round"])
            log(env, f"resuming {self.run_dir.root} after epoch {epoch}, round {rnd}")
        if rnd >= 0:
            self._restore_round(rnd)
        if self.ckpt is not None:
            self.load_checkpoint(self.ckpt)
        if rnd < 0:
            self.round_zero()
            rnd = 0
            self._stop_if_signalled("after round 0")
        while True:
            nxt = rnd + 1
            if nxt <= cfg.caption_rounds and epoch >= cfg.round_end_epoch(nxt):  # no round after the last epoch
                # unless final_caption_round: its captions would never be trained on
                self.caption_round(nxt, epoch)
                rnd = nxt
                self._stop_if_signalled(f"after round {rnd}")
                if time.time() - self._last_report > 60:  # keep the report fresh on long runs, cheap on short ones
                    self._report()
                continue
            if epoch >= cfg.epochs:
                break
            self.train_epoch(epoch, rnd + 1)
            epoch += 1
            self.save_checkpoint(epoch, rnd)
            self._stop_if_signalled(f"after epoch {epoch}", saved=True)
        self._report(final=True)
        log(env, f"done: {cfg.epochs} epochs, {rnd} rounds in {time.time() - t_start:.1f} s; "
                 f"report: {self.run_dir.path('report.html')}")
        if cfg.is_demo:
            from rest_fast.train.demo import demo_notice

            log(env, demo_notice(cfg.blip))
        return self.run_dir.root

    _last_report = 0.0

    def _progress_bar(self, desc: str, total: int | None = None):
        return _progress(self.cfg, self.env, desc, total)

    def _report(self, final: bool = False) -> None:
        self._last_report = time.time()
        if not self.env.is_main:
            return
        from rest_fast.train.report import write_report

        try:
            write_report(self.run_dir.root, max_videos=self.cfg.report_videos, frames_of=self.inputs.frame_strip)
        except Exception as exc:  # noqa: BLE001 - a plotting failure must not kill a training run
            print(f"warning: report not written ({type(exc).__name__}: {exc})", flush=True)


def _sent(stats: dict) -> str:
    """The re-rank's bytes sent by rank 0 this round, when the caption table is sharded (issue 20)."""
    if "rerank_bytes_sent" not in stats:
        return ""
    return f", re-rank sent {stats['rerank_bytes_sent']:,} bytes from rank 0"


def _saved_world_size(features: Path, rnd: int) -> int | None:
    """The world size whose per-rank caption-feature files of rounds ``0..rnd`` are all in ``features``, if any."""
    found = [1] if (features / _caption_rows_name(0)).is_file() else []
    found += sorted(int(p.name.split("_of")[1].split(".")[0]) for p in features.glob("caption_rows_00.rank000_of*.npy"))
    for w in found:
        if all((features / _caption_rows_name(t, r, w)).is_file() for t in range(rnd + 1) for r in range(w)):
            return w
    return None


def _caption_rows_name(r: int, rank: int = 0, world_size: int = 1) -> str:
    """File of the caption-feature rows added in round ``r`` (rows of rounds 0..r, in order, make the table); under
    torchrun each rank's own rows (ids ``c`` with ``c mod world_size == rank``)."""
    if world_size == 1:
        return f"caption_rows_{r:02d}.npy"
    return f"caption_rows_{r:02d}.rank{rank:03d}_of{world_size:03d}.npy"


def ddp_options(env: DistEnv, accum_steps: int = 1) -> dict:
    """DDP arguments of the self-training module.

    ``gradient_as_bucket_view``: gradients are views into the all-reduce buckets (no second copy of the gradients,
    no bucket↔grad copies). ``static_graph``: every step uses the same parameters in the same order (the loss runs
    the whole captioner; no branch skips a layer), which lets DDP overlap and skip the unused-parameter search, and
    is valid with non-reentrant activation checkpointing. Not with gradient accumulation (``accum_steps > 1``): a
    static graph's first step cannot run under ``no_sync``, so that step would all-reduce every micro-batch — exact
    in value, but rounded differently from the other steps, and a run resumed mid-epoch would not repeat it bit for bit.
    """
    ids = [env.device.index] if env.device.type == "cuda" else None
    return {"device_ids": ids, "gradient_as_bucket_view": True, "static_graph": accum_steps == 1}


def _discard_failed_start(root: Path) -> None:
    """Remove the run folder a start that failed on a user error made (it did not exist before this call, so
    everything in it is ours), unless the run got as far as a complete state."""
    if root.is_dir() and not (root / "state.json").exists():
        shutil.rmtree(root, ignore_errors=True)


def train(cfg: TrainConfig, *, resume: str | None = None) -> Path:
    """Run (or resume) Algorithm 1 with ``cfg``; returns the run directory. Works under torchrun."""
    check_available(cfg.log_to)  # a dashboard package that is missing: one line, before anything is written
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = dist_utils.setup(cfg.device, timeout_s=cfg.nccl_timeout)
    out = Path(cfg.out)
    fresh = not out.exists()
    try:
        trainer = Trainer(cfg, env, resume=resume)
        try:
            with trainer.signals:  # SIGTERM/SIGINT/SIGUSR1: checkpoint, then Preempted (rest_fast.train.preempt)
                return trainer.run()
        finally:
            trainer.close()
    except UserError:
        if fresh and env.is_main:
            _discard_failed_start(out)
        raise
    finally:
        dist_utils.cleanup(env)
        torch.set_num_threads(threads)
