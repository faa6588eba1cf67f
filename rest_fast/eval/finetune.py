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
``rest-fast eval --checkpoint OUT`` works), ``bad_files.tsv``, and ``eval/`` (what ``rest-fast eval`` writes).
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
             progress: bool = True, on_epoch: Callable[[dict], None] | None = None, decoder: str = "pyav"):
    """Train ``model`` in place on ``videos`` = ``[(path, label)]`` with ``class_captions(class_names)[label]``
    as each video's caption. Returns ``(epoch records, bad-files report)``.

    Clips are ``[B, T, 3, S, S]`` (``T = num_frames``, ``S = image_size``) normalised with ``mean``/``std``; the
    order and the augmentations are seeded by ``(seed, epoch)``. The loss is :meth:`GARModel.loss` with
    ``prompt`` (the prompt the model generates with) and ``label_smoothing``. ``decoder``: "pyav" or "dali"
    (:func:`rest_fast.data.shards.make_clip_loader`); ``num_workers`` -1 = from the CPUs.
    """
    from rest_fast.data.index import VideoIndex
    from rest_fast.data.shards import make_clip_loader, prepared_index_of
    from rest_fast.run.optim import build_optimizer, build_scheduler, derive_seed

    if not videos:
        raise ValueError("no training videos")
    for name, v in (("epochs", epochs), ("batch-size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 < lr or not 0 <= lr_min <= lr:
        raise ValueError(f"need lr > 0 and 0 <= lr-min <= lr, got lr={lr}, lr-min={lr_min}")
    captions = class_captions(class_names)
    device = torch.device(device)
    paths, labels = [p for p, _ in videos], [y for _, y in videos]
    # videos of a prepared --data folder are read from its shards (as train and eval do), others by PyAV
    index = prepared_index_of(paths, labels, list(class_names))
    if index is None:
        index = VideoIndex.from_paths(paths, labels, class_names=list(class_names))
    bs = min(batch_size, len(index))
    loader = make_clip_loader(index, decoder=decoder, batch_size=bs, mean=mean, std=std, num_frames=num_frames,
                              size=image_size, train=augment, shuffle=True, drop_last=False, seed=seed, device=device,
                              num_workers=num_workers)
    steps = len(loader) * epochs
    model.to(device)  # before the optimiser: it picks fused AdamW only for parameters already on CUDA
    optimizer = build_optimizer(model, lr, weight_decay, (0.9, 0.98))
    scheduler = build_scheduler(optimizer, steps, 0, lr, lr_min)
    records = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fine-tuning", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
    for epoch in range(epochs):
        model.train()
        torch.manual_seed(derive_seed(seed, epoch, 11))  # dropout draws of this epoch
        loader.set_epoch(epoch)
        t0, total, count = time.time(), 0.0, 0
        for batch in loader:
            # labels of the entries actually read (a bad file's deterministic replacement carries its own)
            texts = [captions[int(y)] for y in batch.labels.tolist()]
            loss = model.loss(batch.clips, texts, prompt=prompt, label_smoothing=label_smoothing).loss
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
        rec = {"epoch": epoch + 1, "loss": total / max(count, 1), "lr": optimizer.param_groups[0]["lr"],
               "steps": count, "seconds": round(time.time() - t0, 3)}
        records.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    if bar is not None:
        bar.close()
    model.eval()
    return records, loader.bad_files


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
        shutil.copy(pre, tmp / pre.name)
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
    from rest_fast.eval.checkpoint import (
        CheckpointError,
        image_size_of,
        load_model,
        pixel_normalisation,
        resolve_checkpoint,
    )
    from rest_fast.eval.run import _device, _settings, resolve_decoder

    try:
        plan = _plan(args)
        resolved = resolve_checkpoint(args.checkpoint)
        settings = _settings(resolved, args.num_beams, args.max_length, args.min_length, args.prompt)
        settings.validate()
        dev = _device(args.device)
        decoder = resolve_decoder(args.decoder, dev, "finetune")
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
        if len(runs) > 1:
            print(f"== split {run['split']} ({k + 1}/{len(runs)}): training list {run['train_list']}",
                  file=sys.stderr, flush=True)
        rc, res = _train_and_eval(args, plan, run, model, resolved, settings, dev, run_out, t, size, mean, std,
                                  decoder)
        if rc:
            return rc
        per_split.append((run, res))
    if len(runs) > 1 and not args.no_eval:
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
                    mean, std, decoder: str = "pyav") -> tuple[int, dict | None]:
    """Fine-tune ``model`` on ``run["train"]``, save it to ``out/model``, evaluate on ``run["eval_sets"]``.
    Returns ``(exit code, evaluation results or None)``."""
    from rest_fast.atomic_io import atomic_write_json, atomic_write_text
    from rest_fast.data.bad_files import TooManyBadFiles
    from rest_fast.eval.checkpoint import CheckpointError, describe, load_clip
    from rest_fast.eval.matchers import get_matcher
    from rest_fast.eval.run import evaluate_model

    train = run["train"]
    out.mkdir(parents=True, exist_ok=True)
    config = {"mode": "supervised" if args.supervised else "few-shot", "shots": args.shots,
              "protocol": args.protocol, "split": run["split"], "train_list": run["train_list"],
              "data": args.data, "data_root": args.data_root,
              "checkpoint": describe(resolved), "epochs": plan["epochs"], "lr": args.lr, "lr_min": args.lr_min,
              "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
              "batch_size": args.train_batch_size, "augment": not args.no_augment, "seed": args.seed,
              "num_frames": t, "image_size": size, "prompt": settings.prompt,
              "train_videos": len(train.videos), "train_missing": len(train.missing),
              "classes": len(train.class_names)}
    atomic_write_json(out / "finetune.json", config)
    atomic_write_text(out / "train_videos.txt", "".join(f"{p} {y}\n" for p, y in train.videos))
    atomic_write_text(out / "missing_train.txt", "".join(m + "\n" for m in train.missing))
    if train.missing:
        print(f"{len(train.missing)} of {train.listed} training videos missing (missing_train.txt); training on "
              f"{len(train.videos)}", file=sys.stderr)
    print(f"fine-tuning ({config['mode']}) on {len(train.videos)} videos of {len(train.class_names)} classes for "
          f"{plan['epochs']} epochs (T={t}, S={size}) on {dev}", file=sys.stderr, flush=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()

    def on_epoch(rec: dict) -> None:
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
                          decoder=decoder)
    except (ValueError, TooManyBadFiles) as exc:
        print(f"rest-fast finetune: error: {one_line(exc)}", file=sys.stderr)
        return 2, None
    bad.write(out)
    saved = _save_model(model, resolved.blip_source, out)
    print(f"model saved to {saved}", file=sys.stderr)
    if args.no_eval or not run["eval_sets"]:
        if not args.no_eval:
            print("no evaluation set (every video was used for training); pass --eval-data", file=sys.stderr)
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
                             decoder=decoder, max_unreadable=getattr(args, "max_unreadable", 0.05))
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"rest-fast finetune: evaluation failed: {one_line(exc)}", file=sys.stderr)
        return 1, None
    print(f"results in {out / 'eval'}", file=sys.stderr)
    return 0, res
