"""``rest-fast finetune``: fine-tune the captioner with class names as captions, then evaluate.

Two settings of the REST paper use labels, and both train the same way — the class name of each video
(cleaned: ``ApplyEyeMakeup`` → "apply eye makeup", :func:`rest_fast.eval.clip_tam.clean_class_name`) is its
caption, trained with the captioning loss (Eq. 2, label smoothing) under AdamW + cosine decay, with the Table 10
augmentations:

* **few-shot** (``--shots M``): on each of the protocol's 3 train/test splits (HMDB-51 / UCF-101; ``--split``
  picks one), for ``max(400 / M, 30)`` epochs (paper Table 10: 200, 100, 50, 30 epochs for 2, 4, 8, 16 shots),
  each split starting from the checkpoint, then evaluation on that split's test list; top-1/top-5 are reported
  per split and as mean ± std. Split 1 trains on the published M-shot list (X-CLIP / ViFi-CLIP, shipped in
  :mod:`rest_fast.eval.protocols`); splits 2 and 3 on lists derived from the data root minus the split's test
  list (:func:`rest_fast.eval.protocols.derive_few_shot`, fixed seed). On a ``--data`` set, M videos per class
  are drawn (seeded) and the rest of the set is the test set.
* **supervised** (``--supervised``): the class-label GAR baseline of Tables 1 and 8 — train on a whole labelled
  ``--data`` set (K400 in the paper), then evaluate on ``--protocol`` (zero-shot transfer), ``--eval-data``, or
  the training set itself, with the paper's schedule (Table 10: 60 epochs) at S=224 whatever the checkpoint's
  native frame size (``--epochs`` / ``--image-size`` override).

Outputs in ``--out`` (with several few-shot splits: one ``split<s>/`` folder each, and ``results.json`` /
``table.md`` with the mean ± std over splits at the top): ``finetune.json`` (the resolved settings), ``train_videos.txt`` / ``missing_train.txt``,
``metrics.jsonl`` (one record per epoch), ``model/`` (:meth:`GARModel.save_pretrained`, so
``rest-fast eval --checkpoint OUT`` works), ``bad_files.tsv``, and ``eval/`` (what ``rest-fast eval`` writes);
``checkpoints/epoch_XXXX/`` (the newest epoch: weights, optimiser, schedule) for ``--resume auto``, which
continues an interrupted run (equal to an uninterrupted one) and leaves a finished one (``finished.json``) alone.
Under torchrun or srun it trains with DDP (``--train-batch-size`` stays the global batch) and evaluates with one
block of the videos per rank; rank 0 writes every file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rest_fast.errors import UserError, one_line

__all__ = ["few_shot_epochs", "class_captions", "finetune", "sample_shots", "run_finetune",
           "SUPERVISED_EPOCHS", "SUPERVISED_IMAGE_SIZE"]

SUPERVISED_EPOCHS = 60  # paper Table 10 (the class-label baseline trains on the schedule REST uses)
SUPERVISED_IMAGE_SIZE = 224  # paper Table 10: S = 224, whatever the checkpoint's native size
FINISHED = "finished.json"  # written last: `--resume auto` leaves a folder holding it as it is


def few_shot_epochs(shots: int) -> int:
    """Paper Table 10: ``max(400 / M, 30)`` epochs for M-shot training (rounded up)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    return max(math.ceil(400 / shots), 30)


def class_captions(class_names: Sequence[str]) -> list[str]:
    """The caption each class trains with: its name cleaned the way CLIP-TAM cleans it (same text both ways)."""
    from rest_fast.eval.clip_tam import clean_class_name

    return [clean_class_name(c) for c in class_names]


def sample_shots(labels: Sequence[int], shots: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, rest)`` indices: ``shots`` per class drawn without replacement (seeded), the others.

    A class with fewer than ``shots`` videos gives all of them to training (and none to the rest).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, shots])
    train: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        train.extend(int(i) for i in rng.permutation(idx)[:shots])
    train.sort()
    chosen = set(train)
    return train, [i for i in range(len(labels)) if i not in chosen]


def finetune(model, videos: Sequence[tuple[str, int]], class_names: Sequence[str], *, mean, std, num_frames: int,
             image_size: int, epochs: int, lr: float = 2e-5, lr_min: float = 2e-8, weight_decay: float = 1e-3,
             label_smoothing: float = 0.2, batch_size: int = 64, augment: bool = True, seed: int = 0,
             prompt: str = "a video of", device: torch.device | str = "cpu", num_workers: int = 0,
             progress: bool = True, on_epoch: Callable[[dict], None] | None = None, decoder: str = "pyav",
             ranks=None, checkpoints: str | os.PathLike | None = None, resume: bool = False,
             on_resume: Callable[[list[dict]], None] | None = None, save_every_minutes: float = 0.0):
    """Train ``model`` in place on ``videos`` = ``[(path, label)]`` with ``class_captions(class_names)[label]``
    as each video's caption. Returns ``(epoch records, bad-files report)``.

    ``ranks`` (:class:`rest_fast.run.ranks.Ranks`, under torchrun/srun): DDP, each rank reading its share of
    every epoch (``batch_size`` stays the global batch). ``checkpoints``: a folder that gets
    ``checkpoints/epoch_XXXX/`` (weights, optimiser, schedule, records; the newest kept) after the last epoch
    and after every epoch that ends ``save_every_minutes`` or more after the previous save (0: every epoch),
    written by rank 0; with ``resume`` training continues after the newest intact one, and the result equals
    an uninterrupted run's (the order, augmentations and dropout of an epoch are seeded by the epoch);
    ``on_resume`` then receives the records of the epochs already done.

    Clips are ``[B, T, 3, S, S]`` (``T = num_frames``, ``S = image_size``) normalised with ``mean``/``std``; the
    order and the augmentations are seeded by ``(seed, epoch)``. The loss is :meth:`GARModel.loss` with
    ``prompt`` (the prompt the model generates with) and ``label_smoothing``. ``decoder``: "pyav" or "dali"
    (:func:`rest_fast.data.shards.make_clip_loader`); ``num_workers`` -1 = from the CPUs.
    """
    from rest_fast.data.index import VideoIndex
    from rest_fast.data.shards import make_clip_loader, prepared_index_of
    from rest_fast.run.optim import build_optimizer, build_scheduler, derive_seed
    from rest_fast.run.ranks import Ranks

    ranks = ranks or Ranks()

    if not videos:
        raise ValueError("no training videos")
    for name, v in (("epochs", epochs), ("batch-size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if save_every_minutes < 0:
        raise ValueError(f"save-every-minutes must be >= 0, got {save_every_minutes}")
    if not 0 < lr or not 0 <= lr_min <= lr:
        raise ValueError(f"need lr > 0 and 0 <= lr-min <= lr, got lr={lr}, lr-min={lr_min}")
    captions = class_captions(class_names)
    device = torch.device(device)
    paths, labels = [p for p, _ in videos], [y for _, y in videos]
    # videos of a prepared --data folder are read from its shards (as train and eval do), others by PyAV
    index = prepared_index_of(paths, labels, list(class_names))
    if index is None:
        index = VideoIndex.from_paths(paths, labels, class_names=list(class_names))
    bs = max(1, min(batch_size, len(index)) // ranks.world_size)  # the global batch, cut over the ranks
    loader = make_clip_loader(index, decoder=decoder, batch_size=bs, mean=mean, std=std, num_frames=num_frames,
                              size=image_size, train=augment, shuffle=True, drop_last=False, seed=seed, device=device,
                              num_workers=num_workers, rank=ranks.rank, world_size=ranks.world_size)
    steps = len(loader) * epochs
    model.to(device)  # before the optimiser: it picks fused AdamW only for parameters already on CUDA
    optimizer = build_optimizer(model, lr, weight_decay, (0.9, 0.98))
    scheduler = build_scheduler(optimizer, steps, 0, lr, lr_min)
    step_loss = _ddp_loss(model, prompt, label_smoothing, ranks, device)
    records, start = [], 0
    if resume and checkpoints is not None:
        records = _restore(Path(checkpoints), model, optimizer, scheduler, verbose=ranks.is_main)
        start = len(records)
        if on_resume is not None:
            on_resume(records)
    last_save = time.monotonic()
    bar = None
    if progress and ranks.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start * len(loader), desc="fine-tuning", unit="step", file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    for epoch in range(start, epochs):
        model.train()
        # dropout draws of this epoch (rank 0's are the one-process ones)
        torch.manual_seed(derive_seed(seed, epoch, 11, *([ranks.rank] if ranks.rank else [])))
        loader.set_epoch(epoch)
        t0, total, count = time.time(), 0.0, 0
        for batch in loader:
            # labels of the entries actually read (a bad file's deterministic replacement carries its own)
            texts = [captions[int(y)] for y in batch.labels.tolist()]
            loss = step_loss(batch.clips, texts)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
            count += 1
            if bar is not None:
                bar.update(1)
        steps_done = count  # optimiser steps (every rank takes as many)
        if ranks.distributed:  # the epoch's mean loss over every rank's steps
            total, count = (sum(x) for x in zip(*ranks.gather((total, count))))
        rec = {"epoch": epoch + 1, "loss": total / max(count, 1), "lr": optimizer.param_groups[0]["lr"],
               "steps": steps_done, "seconds": round(time.time() - t0, 3)}
        records.append(rec)
        # rank 0's clock decides, so every rank takes part in the same saves
        due = ranks.broadcast(epoch + 1 == epochs or time.monotonic() - last_save >= 60 * save_every_minutes)
        if checkpoints is not None and due:
            _save_checkpoint(Path(checkpoints), model, optimizer, scheduler, records, ranks)
            last_save = time.monotonic()
        if on_epoch is not None:
            on_epoch(rec)
    if bar is not None:
        bar.close()
    model.eval()
    return records, loader.bad_files


class _CaptionLoss(torch.nn.Module):
    """``forward(clips, texts) -> loss``: the captioning loss as a Module, so DDP can wrap it."""

    def __init__(self, model, prompt: str, label_smoothing: float):
        super().__init__()
        self.model, self.prompt, self.label_smoothing = model, prompt, label_smoothing

    def forward(self, clips, texts):
        return self.model.loss(clips, texts, prompt=self.prompt, label_smoothing=self.label_smoothing).loss


def _ddp_loss(model, prompt: str, label_smoothing: float, ranks, device: torch.device):
    """The step's loss function: the model's own, or through DDP (gradients all-reduced) with several ranks."""
    module = _CaptionLoss(model, prompt, label_smoothing)
    if not ranks.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, gradient_as_bucket_view=True, static_graph=True)


def _save_checkpoint(folder: Path, model, optimizer, scheduler, records: list[dict], ranks) -> None:
    """``folder/checkpoints/epoch_XXXX`` (rank 0; the older ones pruned), then every rank goes on."""
    from rest_fast.run.rundir import RunDir

    if ranks.is_main:
        run = RunDir(folder, writable=False)  # only checkpoints/: a fine-tuning folder is no trainer run
        run.checkpoint_dir(0).parent.mkdir(parents=True, exist_ok=True)
        train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "records": [dict(r) for r in records]}
        ckpt = run.save_checkpoint(len(records), model.state_dict(), train_state, {"kind": "finetune"})
        run.prune_checkpoints(1, protect=[ckpt])
    ranks.barrier()


def _restore(folder: Path, model, optimizer, scheduler, verbose: bool = True) -> list[dict]:
    """Load the newest intact checkpoint of ``folder`` into the model, optimiser and schedule (on every rank);
    its epoch records (``[]`` when there is none: training starts from the beginning)."""
    from rest_fast.run.rundir import RunDir

    ckpt, skipped = RunDir(folder, writable=False).newest_intact_checkpoint()
    for problem in skipped if verbose else ():
        print(f"warning: skipped a damaged checkpoint: {problem}", file=sys.stderr)
    if ckpt is None:
        return []
    model_state, train_state, _ = RunDir.load_checkpoint(ckpt)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    if verbose:
        print(f"resuming fine-tuning from {ckpt} (epoch {len(train_state['records'])})", file=sys.stderr, flush=True)
    return [dict(r) for r in train_state["records"]]


# ------------------------------------------------------------------------------------------- command
def _plan(args) -> dict:
    """Validate the mode and work out the training and evaluation sets (no model loaded yet)."""
    from rest_fast.eval import protocols
    from rest_fast.eval.run import EvalSet, build_sets

    if args.supervised and args.shots is not None:
        raise ValueError("--supervised trains on all of --data; --shots is for few-shot training (pick one)")
    if not args.supervised and args.shots is None:
        raise ValueError("pass --shots M (few-shot, with --protocol or --data) or --supervised (with --data)")
    runs: list[dict] = []
    if args.shots is not None:
        if args.protocol is not None and args.data is None:
            if protocols.shots(args.protocol) == ():
                raise ValueError(f"--protocol {args.protocol} has no few-shot lists (hmdb51 and ucf101 do)")
            if args.data_root is None:
                raise ValueError(f"--protocol {args.protocol} needs --data-root DIR")
            if args.shots not in protocols.shots(args.protocol):
                protocols.get(args.protocol, shots=args.shots)  # raises, naming the valid sizes
            if args.split is None or str(args.split).strip().lower() == "all":
                chosen = list(protocols.splits(args.protocol))
            else:
                chosen = [protocols.get(args.protocol, split=args.split).split]  # validates, names the splits
            for s in chosen:
                # split 1: the published M-shot list; 2 and 3: derived from the data root (seeded)
                proto = (protocols.get(args.protocol, shots=args.shots) if s == 1 else
                         protocols.derive_few_shot(args.protocol, s, args.shots, args.data_root, seed=args.seed))
                found, missing = proto.locate(args.data_root, walk=args.walk)
                train = EvalSet(proto.name, None, proto.class_names, found, [], missing)
                evs = [] if args.no_eval else build_sets(protocol=args.protocol, data_root=args.data_root, split=s,
                                                          walk=args.walk)
                runs.append({"split": s, "train": train, "eval_sets": evs, "train_list": proto.video_list})
            name = f"{proto.name}_{args.shots}shot"
        elif args.data is not None and args.protocol is None:
            full = build_sets(data=args.data, classes=args.classes, data_root=args.data_root)[0]
            tr, rest = sample_shots([y for _, y in full.videos], args.shots, args.seed)
            train = EvalSet(full.name, None, full.class_names, [full.videos[i] for i in tr], [], full.missing)
            name = f"{full.name}_{args.shots}shot"
            eval_sets: list = []
            if args.eval_data is not None:
                eval_sets = build_sets(data=args.eval_data, classes=args.eval_classes)
            elif rest:
                eval_sets = [EvalSet(f"{full.name}_heldout", None, full.class_names, [full.videos[i] for i in rest],
                                     [full.rel[i] for i in rest])]
            runs.append({"split": None, "train": train, "eval_sets": eval_sets, "train_list": args.data})
        else:
            raise ValueError("few-shot training takes --protocol NAME --data-root DIR, or --data LIST_OR_DIR")
        epochs = args.epochs if args.epochs is not None else few_shot_epochs(args.shots)
    else:
        if args.data is None:
            raise ValueError("--supervised trains on a labelled --data LIST_OR_DIR (--protocol then names the "
                             "evaluation protocol)")
        train = build_sets(data=args.data, classes=args.classes,
                           data_root=args.data_root if args.protocol is None else None)[0]
        name = f"{train.name}_supervised"
        eval_sets = []
        if not args.no_eval:
            if args.protocol is not None and args.eval_data is not None:
                raise ValueError("evaluate on --protocol or on --eval-data, not both")
            if args.protocol is not None:
                eval_sets = build_sets(protocol=args.protocol, data_root=args.data_root, split=args.split,
                                       walk=args.walk)
            elif args.eval_data is not None:
                eval_sets = build_sets(data=args.eval_data, classes=args.eval_classes)
            else:
                eval_sets = [train]  # training-set accuracy: says the model learnt the names, not how it transfers
        runs.append({"split": None, "train": train, "eval_sets": eval_sets, "train_list": args.data})
        epochs = args.epochs if args.epochs is not None else SUPERVISED_EPOCHS
    for run in runs:
        train = run["train"]
        if not train.videos:
            where = f" (split {run['split']})" if run["split"] is not None else ""
            raise FileNotFoundError(f"none of the {train.listed} training videos was found{where}"
                                    + (f" (e.g. {train.missing[0]!r})" if train.missing else ""))
    # "train"/"eval_sets": the first (often only) run, as before several splits existed
    return {"runs": runs, "train": runs[0]["train"], "eval_sets": runs[0]["eval_sets"], "name": name,
            "epochs": int(epochs)}


def _save_model(model, src_dir: str, out: Path) -> Path:
    """``out/model`` written whole (temp folder renamed into place), with BLIP's preprocessor config if any."""
    final = out / "model"
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    pre = Path(src_dir) / "preprocessor_config.json"
    if pre.is_file():
        shutil.copyfile(pre, tmp / pre.name)  # a new file: the umask, not the source's mode
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def run_finetune(args) -> int:
    """The ``rest-fast finetune`` command (arguments defined in :mod:`rest_fast.cli`)."""
    from rest_fast.eval.run import cpu_threads

    with cpu_threads(args.threads):
        return _run_finetune(args)


def _run_finetune(args) -> int:
    from rest_fast.eval.run import _device
    from rest_fast.run.ranks import close_ranks, init_ranks

    try:
        dev = _device(args.device)
    except ValueError as exc:
        print(f"rest-fast finetune: error: {one_line(exc)}", file=sys.stderr)
        return 2
    ranks, dev, owned = init_ranks(dev)
    try:
        return _run_finetune_on(args, ranks, dev)
    finally:
        close_ranks(owned)


def _run_finetune_on(args, ranks, dev) -> int:
    """The command on this rank (``ranks``: under torchrun/srun, DDP training and sharded evaluation)."""
    from rest_fast.eval.checkpoint import (
        CheckpointError,
        image_size_of,
        load_model,
        pixel_normalisation,
        resolve_checkpoint,
    )
    from rest_fast.eval.run import _settings, resolve_decoder

    try:
        plan = _plan(args)
        resolved = resolve_checkpoint(args.checkpoint)
        settings = _settings(resolved, args.num_beams, args.max_length, args.min_length, args.prompt)
        settings.validate()
        decoder = resolve_decoder(args.decoder, dev, "finetune", verbose=ranks.is_main)
        model = load_model(resolved, dev)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"rest-fast finetune: error: {one_line(exc)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / "finetune" / plan["name"]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    t = int(args.num_frames or resolved.defaults.get("num_frames") or model.num_frames)
    if args.image_size:
        size = int(args.image_size)
    elif args.supervised:
        size = SUPERVISED_IMAGE_SIZE  # the paper's S, not the checkpoint's native size (BLIP base: 384)
    else:
        size = int(resolved.defaults.get("image_size") or image_size_of(model))
    mean, std = pixel_normalisation(resolved)
    runs = plan["runs"]
    per_split = []
    for k, run in enumerate(runs):
        if k > 0:  # every split starts again from the checkpoint
            model = load_model(resolved, dev)
        run_out = out / f"split{run['split']}" if len(runs) > 1 else out
        if len(runs) > 1 and ranks.is_main:
            print(f"== split {run['split']} ({k + 1}/{len(runs)}): training list {run['train_list']}",
                  file=sys.stderr, flush=True)
        rc, res = _train_and_eval(args, plan, run, model, resolved, settings, dev, run_out, t, size, mean, std,
                                  decoder, ranks)
        if rc:
            return rc
        per_split.append((run, res))
    if len(runs) > 1 and not args.no_eval and ranks.is_main:
        _write_split_summary(out, plan, per_split)
    return 0


def _write_split_summary(out: Path, plan: dict, per_split: list) -> dict:
    """``OUT/results.json`` and ``OUT/table.md``: each split's top-1/top-5 and the mean ± std over splits."""
    from rest_fast.atomic_io import atomic_write_json, atomic_write_text
    from rest_fast.eval.metrics import mean_std
    from rest_fast.eval.run import format_table

    sets = []
    for run, res in per_split:
        entry = dict(res["sets"][0]) if res and res.get("sets") else {}
        entry.update({"name": plan["name"], "split": run["split"], "train_videos": len(run["train"].videos),
                      "train_list": run["train_list"], "out": f"split{run['split']}"})
        for key in ("n", "missing", "unreadable"):
            entry.setdefault(key, 0)
        sets.append(entry)
    summary = {"splits": len([e for e in sets if "top1" in e])}
    for key in ("top1", "top5"):
        vals = [e[key] for e in sets if key in e]
        if vals:
            m, sd = mean_std(vals)
            summary[key] = {"mean": m, "std": sd}
    results = {"mode": "few-shot", "epochs": plan["epochs"], "sets": sets, "summary": {plan["name"]: summary}}
    table = format_table(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", table)
    print(table, end="", flush=True)
    print(f"results in {out}", file=sys.stderr)
    return results


def _train_and_eval(args, plan: dict, run: dict, model, resolved, settings, dev, out: Path, t: int, size: int,
                    mean, std, decoder: str = "pyav", ranks=None) -> tuple[int, dict | None]:
    """Fine-tune ``model`` on ``run["train"]``, save it to ``out/model``, evaluate on ``run["eval_sets"]``.
    Returns ``(exit code, evaluation results or None)``. Rank 0 writes every file; with ``--resume auto`` a
    finished ``out`` is kept as it is and an interrupted one continues from its last epoch checkpoint."""
    from rest_fast.atomic_io import atomic_write_json, atomic_write_text
    from rest_fast.data.bad_files import TooManyBadFiles
    from rest_fast.eval.checkpoint import CheckpointError, describe, load_clip
    from rest_fast.eval.matchers import get_matcher
    from rest_fast.eval.run import evaluate_model
    from rest_fast.run.ranks import Ranks
    from rest_fast.run.shared_fs import check_shared_folder

    ranks = ranks or Ranks()
    main = ranks.is_main
    resume = getattr(args, "resume", None) == "auto"

    train = run["train"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
    check_shared_folder(out, ranks.rank, ranks.world_size)  # a resume reads rank 0's checkpoints on every rank
    config = {"mode": "supervised" if args.supervised else "few-shot", "shots": args.shots,
              "protocol": args.protocol, "split": run["split"], "train_list": run["train_list"],
              "data": args.data, "data_root": args.data_root,
              "checkpoint": describe(resolved), "epochs": plan["epochs"], "lr": args.lr, "lr_min": args.lr_min,
              "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
              "batch_size": args.train_batch_size, "augment": not args.no_augment, "seed": args.seed,
              "num_frames": t, "image_size": size, "prompt": settings.prompt,
              "train_videos": len(train.videos), "train_missing": len(train.missing),
              "classes": len(train.class_names)}
    if resume:
        verdict = _resume_verdict(out, config)  # same decision on every rank (same files)
        if verdict == "done":
            if main:
                print(f"{out}: already fine-tuned with these settings (--resume auto); nothing to do", file=sys.stderr)
            results = out / "eval" / "results.json"
            return 0, (json.loads(results.read_text()) if results.is_file() else None)
        ranks.barrier()  # every rank has read the folder before rank 0 changes it
    if main:
        (out / FINISHED).unlink(missing_ok=True)
        atomic_write_json(out / "finetune.json", config)
        atomic_write_text(out / "train_videos.txt", "".join(f"{p} {y}\n" for p, y in train.videos))
        atomic_write_text(out / "missing_train.txt", "".join(m + "\n" for m in train.missing))
        if not resume:  # a fresh start: an earlier fine-tuning's checkpoints here are not ours to continue
            from rest_fast.run.rundir import RunDir

            RunDir(out, writable=False).prune_checkpoints(0)
    ranks.barrier()
    if train.missing and main:
        print(f"{len(train.missing)} of {train.listed} training videos missing (missing_train.txt); training on "
              f"{len(train.videos)}", file=sys.stderr)
    if main:
        world = f" x {ranks.world_size} ranks" if ranks.distributed else ""
        print(f"fine-tuning ({config['mode']}) on {len(train.videos)} videos of {len(train.class_names)} classes "
              f"for {plan['epochs']} epochs (T={t}, S={size}) on {dev}{world}", file=sys.stderr, flush=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists() and main:
        metrics.unlink()  # a resume rewrites it from its checkpoint (on_resume)

    def on_resume(done: list[dict]) -> None:
        if main:
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in done))

    def on_epoch(rec: dict) -> None:
        if not main:
            return
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"epoch {rec['epoch']}/{plan['epochs']}: loss {rec['loss']:.4f} [{rec['seconds']:.1f} s]",
              file=sys.stderr, flush=True)

    try:
        _, bad = finetune(model, train.videos, train.class_names, mean=mean, std=std, num_frames=t, image_size=size,
                          epochs=plan["epochs"], lr=args.lr, lr_min=args.lr_min, weight_decay=args.weight_decay,
                          label_smoothing=args.label_smoothing, batch_size=args.train_batch_size,
                          augment=not args.no_augment, seed=args.seed, prompt=settings.prompt, device=dev,
                          num_workers=args.num_workers, progress=not args.no_progress, on_epoch=on_epoch,
                          decoder=decoder, ranks=ranks, checkpoints=out, resume=resume, on_resume=on_resume,
                          save_every_minutes=getattr(args, "save_every_minutes", 30.0))
    except (ValueError, TooManyBadFiles) as exc:
        print(f"rest-fast finetune: error: {one_line(exc)}", file=sys.stderr)
        return 2, None
    saved = out / "model"
    if main:
        bad.write(out)
        _save_model(model, resolved.blip_source, out)
        print(f"model saved to {saved}", file=sys.stderr)
    ranks.barrier()
    if args.no_eval or not run["eval_sets"]:
        if not args.no_eval and main:
            print("no evaluation set (every video was used for training); pass --eval-data", file=sys.stderr)
        if main:
            atomic_write_json(out / FINISHED, {"epochs": plan["epochs"]})
        return 0, None
    try:
        clip_model = None
        if str(args.matcher).strip().lower() == "clip":
            clip_model = load_clip(resolved, args.clip, device=dev, batch_size=max(args.batch_size, 64))
        matcher = get_matcher(args.matcher, clip=clip_model, device=str(dev))
        info = {"checkpoint": {"checkpoint": str(saved), "kind": "finetuned", "from": describe(resolved)},
                "protocol": args.protocol, "data": args.eval_data or args.data, "clip": getattr(clip_model, "name", None)}
        res = evaluate_model(model, run["eval_sets"], mean=mean, std=std, num_frames=t, image_size=size,
                             matcher=matcher, settings=settings, out=out / "eval", batch_size=args.batch_size,
                             device=dev, num_workers=args.num_workers, progress=not args.no_progress, info=info,
                             decoder=decoder, max_unreadable=getattr(args, "max_unreadable", 0.05), ranks=ranks,
                             verbose=main)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"rest-fast finetune: evaluation failed: {one_line(exc)}", file=sys.stderr)
        return 1, None
    if main:
        atomic_write_json(out / FINISHED, {"epochs": plan["epochs"]})
        print(f"results in {out / 'eval'}", file=sys.stderr)
    return 0, res


def _resume_verdict(out: Path, config: dict) -> str:
    """``--resume auto`` on ``out``: "done" (finished with these settings: :func:`_train_and_eval` writes
    ``finished.json`` last), else "continue" (train from its newest checkpoint, or from the start when it has
    none); a folder fine-tuned with other settings is refused, naming each differing key."""
    saved = out / "finetune.json"
    if not saved.is_file():
        return "continue"
    before = json.loads(saved.read_text())
    now = json.loads(json.dumps(config))
    diffs = [f"{k}: {before.get(k)!r} (then) != {now.get(k)!r} (now)" for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)]
    if diffs:
        raise UserError(f"--resume auto: {out} was fine-tuned with other settings ({'; '.join(diffs)}); "
                        "pass the same options, or another --out")
    return "done" if (out / FINISHED).is_file() else "continue"
