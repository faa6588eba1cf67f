"""``rest-fast eval`` and ``rest-fast caption``: caption videos by beam search, then score them with CLIP-TAM.

Evaluation of a generative recogniser (paper Sec. 4): every test video is captioned (un-augmented clip,
``T`` segment-centre frames, beam search with the prompt the model was trained with), each caption is mapped to
its nearest class names (:func:`rest_fast.eval.clip_tam`), and top-1 / top-5 are reported per split with the
mean ± std over splits, as in the paper's tables.

What gets evaluated (:func:`build_sets`):

* ``protocol=NAME, data_root=DIR, split=1|2|3|"all"`` — a shipped protocol (:mod:`rest_fast.eval.protocols`);
  videos are found under ``DIR`` with :meth:`Protocol.locate`; listed videos that are not there are *reported*
  (``missing_<set>.txt``, counts in the results and the table) and left out of the accuracy, never fatal;
* ``data=LIST_OR_DIR`` — any labelled set: a folder of class sub-folders (the demo's clips) or a list file of
  ``relative/path label`` lines with ``classes=FILE`` (one class name a line, or ``index name`` lines as in
  UCF's ``classInd.txt``).

A video that cannot be decoded is also left out and reported (``bad_files.tsv``). Each distinct video is
captioned once even when several splits list it (HMDB/UCF splits overlap).

Outputs in ``out`` (all written atomically): ``results.json`` (settings, checkpoint, per-set metrics, mean ± std),
``table.md`` (the paper-like table, also printed), ``predictions_<set>.jsonl`` (per video: video, caption,
label, top-5 classes and their scores), ``missing_<set>.txt``, ``bad_files.tsv``/``.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rest_fast.errors import UserError

__all__ = [
    "EvalSet",
    "CaptionSettings",
    "TooManyUnreadable",
    "DEFAULT_MAX_UNREADABLE",
    "build_sets",
    "read_classes",
    "caption_videos",
    "evaluate_model",
    "evaluate",
    "format_table",
    "cpu_threads",
    "run_eval",
    "run_caption",
]


DEFAULT_MAX_UNREADABLE = 0.05  # fraction of the videos to evaluate that may fail to decode before eval fails


class TooManyUnreadable(UserError):
    """More than the allowed fraction of the evaluated videos could not be decoded (results are still written)."""


@dataclass
class EvalSet:
    """One labelled evaluation set: ``videos`` = ``[(path on disk, label)]`` that exist, ``rel`` their names as
    listed, ``missing`` = listed names not found, ``name``/``split`` for the table."""

    name: str
    split: int | None
    class_names: list[str]
    videos: list[tuple[str, int]]
    rel: list[str]
    missing: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return self.name if self.split is None else f"{self.name}_split{self.split}"

    @property
    def listed(self) -> int:
        return len(self.videos) + len(self.missing)


@dataclass
class CaptionSettings:
    """How captions are generated (lengths count the BOS + prompt tokens, as in HF ``generate``)."""

    prompt: str = "a video of"
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    num_return: int = 1

    def validate(self) -> None:
        for name in ("num_beams", "max_length", "num_return"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.min_length < 0 or self.min_length > self.max_length:
            raise ValueError(f"min-length must be in [0, max-length={self.max_length}], got {self.min_length}")
        if self.num_return > self.num_beams:
            raise ValueError(f"num-return ({self.num_return}) cannot exceed num-beams ({self.num_beams})")


# ----------------------------------------------------------------------------------------------------- sets
def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names from a file: one a line (line order = label), or ``<index> <name>`` lines (sorted by index;
    UCF's ``classInd.txt`` is 1-based, the smallest index becomes label 0)."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--classes {path}: no class names")
    indexed = [re.match(r"^(\d+)[\s,]+(.+)$", ln) for ln in lines]
    if all(indexed):
        pairs = sorted((int(m.group(1)), m.group(2).strip()) for m in indexed)
        idx = [i for i, _ in pairs]
        if len(set(idx)) != len(idx) or idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError(f"--classes {path}: '<index> <name>' lines must have consecutive distinct indices")
        names = [n for _, n in pairs]
    else:
        names = lines
    if len(set(names)) != len(names):
        raise ValueError(f"--classes {path}: duplicate class names")
    return names


def _data_set(data: str, classes: str | None, data_root: str | None) -> EvalSet:
    from rest_fast.data.index import VideoIndex
    from rest_fast.data.shards import PreparedIndex, is_prepared_dir, register_prepared

    p = Path(data)
    if is_prepared_dir(p):  # `rest-fast prepare` output: captioning reads its JPEG shards
        index = PreparedIndex.load(p)
        register_prepared(index)
        names = read_classes(classes) if classes is not None else list(index.class_names or [])
        if not names:
            raise ValueError(f"--data {data}: the prepared set has no class names; pass --classes FILE")
        if index.labels is None:
            raise ValueError(f"--data {data}: the prepared videos have no labels (eval needs labels)")
        root = Path(index.info.get("source_root") or os.path.dirname(os.path.commonpath(index.paths + index.missing)))
    elif p.is_dir():
        index = VideoIndex.from_folder(p)
        root = p
        if index.labels is None:
            raise UserError(f"--data {data}: its videos have no labels (no class sub-folders); eval needs "
                            "labelled videos: one sub-folder per class, or a list file with --classes")
        names = list(index.class_names)
        if classes is not None:
            names = read_classes(classes)
            if len(names) != len(index.class_names):
                raise ValueError(f"--classes has {len(names)} names but {data} has {len(index.class_names)} "
                                 "class sub-folders")
    elif p.is_file():
        if classes is None:
            raise ValueError(f"--data {data} is a list file: pass --classes FILE with its class names "
                             "(CLIP-TAM matches captions to names, not to label numbers)")
        names = read_classes(classes)
        root = Path(data_root) if data_root is not None else p.parent
        index = VideoIndex.from_list(p, root, skip_missing=True, class_names=names)
        if index.labels is None and len(index) + len(index.missing) > 0:
            raise ValueError(f"--data {data}: lines must be 'relative/path label' (eval needs labels)")
    else:
        raise FileNotFoundError(f"--data {data}: neither a folder of class sub-folders nor a list file")
    if index.labels is not None and index.num_unlabelled:  # loose videos beside class folders: not evaluable
        print(f"note: --data {data}: {index.num_unlabelled} unlabelled videos left out of the evaluation",
              file=sys.stderr)
        index = _labelled_only(index)
    labels = index.labels or []
    bad = sorted({y for y in labels if not 0 <= y < len(names)})
    if bad:
        raise ValueError(f"--data {data}: labels {bad[:5]} outside [0, {len(names)}) (the --classes list)")
    rel = [os.path.relpath(q, root) for q in index.paths]
    missing = [os.path.relpath(q, root) for q in index.missing]
    name = p.name if p.is_dir() else p.stem
    return EvalSet(name, None, names, list(zip(index.paths, labels)), rel, missing)


def _labelled_only(index):
    """The labelled entries of a partly labelled index, as a plain VideoIndex (a prepared index's paths stay
    registered, so they still read from its shards); the missing list is kept."""
    from rest_fast.data.index import UNLABELLED, VideoIndex

    keep = [i for i, y in enumerate(index.labels) if y != UNLABELLED]
    return VideoIndex([index.paths[i] for i in keep], [index.labels[i] for i in keep], index.class_names,
                      list(index.missing))


def build_sets(*, protocol: str | None = None, data_root: str | None = None, split=None,
               data: str | None = None, classes: str | None = None, walk: bool = False) -> list[EvalSet]:
    """The sets to evaluate: a protocol's splits (``split`` 1–3, ``"all"`` or ``None`` = all) found under
    ``data_root``, or one labelled set ``data`` (see the module docstring)."""
    from rest_fast.eval import protocols

    if (protocol is None) == (data is None):
        raise ValueError("pass exactly one of --protocol NAME (with --data-root) and --data LIST_OR_DIR")
    if data is not None:
        if split is not None and str(split) != "all":
            raise ValueError("--split is for --protocol; a --data set has no splits")
        return [_data_set(data, classes, data_root)]
    if data_root is None:
        raise ValueError(f"--protocol {protocol} needs --data-root DIR (where the dataset's videos are)")
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"--data-root {data_root} is not a directory")
    if classes is not None:
        raise ValueError("--classes is for --data; a protocol ships its class names")
    valid = protocols.splits(protocol)
    if split is None or str(split).strip().lower() == "all":
        chosen = list(valid)
    else:
        chosen = [protocols.get(protocol, split=split).split]  # get() validates and names the valid splits
    out = []
    for s in chosen:
        proto = protocols.get(protocol, split=s)
        found, missing = proto.locate(data_root, walk=walk)
        out.append(EvalSet(proto.name, proto.split, proto.class_names, found,
                           _listed_names(proto, data_root, found, missing), missing))
    return out


def _listed_names(proto, root, found, missing) -> list[str]:
    # Protocol.locate keeps list order, so the found entries are the listed ones minus the missing, in order.
    missing_set = set(missing)
    names = [r for r, _ in proto.videos if r not in missing_set]
    if len(names) != len(found):  # duplicate listings of a missing name: fall back to the file names
        names = [os.path.relpath(p, root) for p, _ in found]
    return names


# ------------------------------------------------------------------------------------------- captioning
class _EvalClips(torch.utils.data.Dataset):
    """Un-augmented clips (segment centres, central square), uint8; an unreadable file yields its reason."""

    def __init__(self, paths: Sequence[str], num_frames: int, size: int):
        self.paths, self.num_frames, self.size = list(paths), num_frames, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from rest_fast.data.decode import VideoDecodeError
        from rest_fast.data.shards import read_clip_any  # a registered prepared set's paths read its shards

        try:
            return i, read_clip_any(self.paths[i], self.num_frames, size=self.size, train=False), None
        except VideoDecodeError as exc:
            return i, None, exc.reason
        except (OSError, ValueError) as exc:  # e.g. a directory or a permission problem: report, go on
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    return items


def _pyav_batches(paths, *, num_frames, size, mean, std, batch_size, device, num_workers, bad):
    """(rows, normalised clips) per batch of readable videos; unreadable ones go to ``bad``."""
    from rest_fast.data.loader import normalize_clips

    loader = torch.utils.data.DataLoader(_EvalClips(paths, num_frames, size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate, shuffle=False)
    for items in loader:
        ok = [(i, clip) for i, clip, _ in items if clip is not None]
        bad.extend((paths[i], reason) for i, clip, reason in items if clip is None)
        if ok:
            yield [i for i, _ in ok], normalize_clips(torch.stack([c for _, c in ok]), mean, std, device)


def _dali_batches(paths, *, num_frames, size, mean, std, batch_size, device, num_workers, decode_timeout_s, bad):
    """As :func:`_pyav_batches`, decoded by DALI (unreadable videos are dropped from their batch, not resampled)."""
    from rest_fast.data.dali import DALIClipLoader
    from rest_fast.data.index import VideoIndex

    loader = DALIClipLoader(VideoIndex(list(paths)), batch_size=batch_size, mean=mean, std=std, num_frames=num_frames,
                            size=size, device=device, num_workers=num_workers, skip_bad=True, max_retries=0,
                            max_bad_fraction=1.0, decode_timeout_s=decode_timeout_s)
    try:
        for b in loader:
            yield b.index.tolist(), b.clips
    finally:
        bad.extend((p, r) for p, r, _ in loader.bad_files.rows())


def resolve_decoder(requested: str, device, cmd: str, verbose: bool = True, videos=None) -> str:
    """``--decoder`` (auto, dali, pyav) for a command computing on ``device``: "pyav" or "dali", with the
    reason on stderr. ``ValueError`` (one line) for a bad name or ``dali`` without DALI. ``videos``: the files
    to read, probed by ``auto`` before it picks the GPU decoder."""
    from rest_fast.data.select import choose_decoder

    choice = choose_decoder(requested, device, videos=videos)
    if verbose:
        print(f"rest-fast {cmd}: decoder {choice.name} ({choice.reason})", file=sys.stderr, flush=True)
    return choice.name


def caption_videos(model, paths: Sequence[str], *, num_frames: int, size: int, mean, std,
                   settings: CaptionSettings | None = None, batch_size: int = 16,
                   device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                   decoder: str = "pyav", decode_timeout_s: float = 0.0,
                   ) -> tuple[list[list[tuple[str, float]] | None], list[tuple[str, str]]]:
    """Caption every video of ``paths`` by beam search.

    Args:
        model: a :class:`~rest_fast.models.GARModel` (eval mode).
        paths: video files; num_frames (T) and size (S): the clip ``[T, 3, S, S]`` the model sees;
        mean, std: the captioner's pixel normalisation; settings: prompt and beam-search settings.
        decoder: "pyav" (DataLoader workers) or "dali" (:class:`~rest_fast.data.DALIClipLoader` on ``device``'s
            GPU; paths of a registered prepared set always use the shard reader); num_workers: -1 = from the CPUs.
    Returns:
        ``(results, bad)``: ``results[i]`` is the list of ``settings.num_return`` ``(caption, score)`` of video
        ``i``, best first, or ``None`` when it could not be decoded; ``bad`` lists ``(path, reason)``.
    """
    settings = settings or CaptionSettings()
    settings.validate()
    if decoder not in ("pyav", "dali", "nvjpeg"):  # nvjpeg: videos by PyAV (prepared paths: the shard reader)
        decoder = resolve_decoder(decoder, device, "caption", verbose=False, videos=paths)
    if batch_size < 1:
        raise ValueError(f"batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    results: list[list[tuple[str, float]] | None] = [None] * len(paths)
    bad: list[tuple[str, str]] = []
    if not paths:
        return results, bad
    from rest_fast.data.shards import is_registered_prepared
    from rest_fast.data.workers import resolve_num_workers

    num_workers = resolve_num_workers(num_workers)
    if decoder == "dali" and not any(is_registered_prepared(p) for p in paths):
        batches = _dali_batches(paths, num_frames=num_frames, size=size, mean=mean, std=std, batch_size=batch_size,
                                device=device, num_workers=num_workers, decode_timeout_s=decode_timeout_s, bad=bad)
    else:
        batches = _pyav_batches(paths, num_frames=num_frames, size=size, mean=mean, std=std, batch_size=batch_size,
                                device=device, num_workers=num_workers, bad=bad)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="captioning", unit="batch", file=sys.stderr, dynamic_ncols=True, leave=False,
                       total=-(-len(paths) // batch_size))
    r = settings.num_return
    for rows, clips in batches:
        out = model.generate(clips, prompt=settings.prompt, num_beams=settings.num_beams,
                             max_length=settings.max_length, min_length=settings.min_length, num_return_sequences=r)
        scores = out.scores.float().cpu().tolist()
        for j, i in enumerate(rows):
            results[i] = [(out.texts[j * r + k].strip(), float(scores[j * r + k])) for k in range(r)]
    return results, bad


# ------------------------------------------------------------------------------------------- evaluation
def _atomic_text(path: Path, text: str) -> None:
    from rest_fast.atomic_io import atomic_write_text

    atomic_write_text(path, text)


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_table(results: dict) -> str:
    """The paper-like table (markdown): one row per set/split, then mean ± std over splits, top-1 / top-5 in %."""
    rows = ["| set | split | videos | missing | unreadable | top-1 | top-5 |", "|---|---|---|---|---|---|---|"]
    for s in results["sets"]:
        split = "—" if s["split"] is None else str(s["split"])
        rows.append(f"| {s['name']} | {split} | {s['n']} | {s['missing']} | {s['unreadable']} | "
                    f"{_pct(s.get('top1'))} | {_pct(s.get('top5'))} |")
    for name, m in results.get("summary", {}).items():
        if m.get("splits", 0) > 1:
            cells = []
            for k in ("top1", "top5"):
                if k in m:
                    cells.append(f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}")
                else:
                    cells.append("—")
            rows.append(f"| **{name}** | mean ± std ({m['splits']}) | | | | {cells[0]} | {cells[1]} |")
    return "\n".join(rows) + "\n"


def evaluate_model(model, sets: Sequence[EvalSet], *, mean, std, num_frames: int, image_size: int,
                   matcher, settings: CaptionSettings | None = None, out: str | os.PathLike | None = None,
                   batch_size: int = 16, device: torch.device | str = "cpu", num_workers: int = 0,
                   progress: bool = True, info: dict | None = None, verbose: bool = True,
                   decoder: str = "pyav", max_unreadable: float | None = DEFAULT_MAX_UNREADABLE,
                   ranks=None) -> dict:
    """Caption the union of the sets' videos once, CLIP-TAM each set, write the outputs to ``out``.

    ``ranks`` (:class:`rest_fast.run.ranks.Ranks`, under torchrun/srun): each rank captions its block of the
    videos, the blocks are gathered in rank order, and rank 0 alone prints and writes the same files one
    process would (every rank returns the same metrics).

    ``matcher``: a text encoder with ``encode_text`` (see :func:`rest_fast.eval.matchers.get_matcher`).
    Returns the results dict written to ``results.json`` (without the per-video predictions).
    Raises :class:`TooManyUnreadable` AFTER writing everything when more than ``max_unreadable`` of the distinct
    videos found could not be decoded (``None``: never); missing videos are reported, not counted here.
    """
    if max_unreadable is not None and not (0 <= max_unreadable <= 1):
        raise UserError(f"--max-unreadable must be a fraction in [0, 1], got {max_unreadable}")
    from rest_fast.data.bad_files import BadFilesReport
    from rest_fast.eval.clip_tam import score_captions
    from rest_fast.eval.metrics import mean_std
    from rest_fast.run.ranks import Ranks

    ranks = ranks or Ranks()
    verbose, progress = verbose and ranks.is_main, progress and ranks.is_main
    if not ranks.is_main:
        out = None  # rank 0 writes
    settings = settings or CaptionSettings()
    settings = CaptionSettings(settings.prompt, settings.num_beams, settings.max_length, settings.min_length, 1)
    unique = list(dict.fromkeys(p for s in sets for p, _ in s.videos))
    if not unique:
        listed = sum(s.listed for s in sets)
        example = next((m for s in sets for m in s.missing[:1]), None)
        raise FileNotFoundError(f"none of the {listed} listed videos was found"
                                + (f" (e.g. {example!r} under the data root)" if example else ""))
    if verbose:
        print(f"captioning {len(unique)} videos (T={num_frames}, S={image_size}, beams={settings.num_beams}, "
              f"prompt {settings.prompt!r}) on {device}", file=sys.stderr, flush=True)
    caps, bad = caption_videos(model, [unique[i] for i in ranks.shard(len(unique))], num_frames=num_frames,
                               size=image_size, mean=mean, std=std, settings=settings, batch_size=batch_size,
                               device=device, num_workers=num_workers, progress=progress, decoder=decoder)
    if ranks.distributed:  # the blocks back in rank order: the one-process order of captions and bad files
        parts = ranks.gather((caps, bad))
        caps, bad = [c for p, _ in parts for c in p], [b for _, p in parts for b in p]
    by_path = {p: c for p, c in zip(unique, caps)}
    bad_report = BadFilesReport()
    for p, reason in bad:
        bad_report.add(p, reason)

    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {**(info or {}), "settings": {"num_frames": num_frames, "image_size": image_size,
                                            "prompt": settings.prompt, "num_beams": settings.num_beams,
                                            "max_length": settings.max_length, "min_length": settings.min_length,
                                            "matcher": repr(matcher)},
               "sets": [], "summary": {},
               "unreadable": {"videos": len(bad), "of": len(unique), "max_fraction": max_unreadable}}
    for s in sets:
        keep = [(p, y, r) for (p, y), r in zip(s.videos, s.rel) if by_path.get(p) is not None]
        unreadable = [r for (p, _), r in zip(s.videos, s.rel) if by_path.get(p) is None]
        entry = {"name": s.name, "split": s.split, "listed": s.listed, "n": len(keep), "missing": len(s.missing),
                 "unreadable": len(unreadable), "num_classes": len(s.class_names)}
        preds = []
        if keep:
            captions = [by_path[p][0][0] for p, _, _ in keep]
            scored = score_captions(captions, [y for _, y, _ in keep], s.class_names, matcher,
                                    videos=[r for _, _, r in keep])
            preds = scored.pop("predictions")
            for item, (p, _, _) in zip(preds, keep):
                item["caption_score"] = round(by_path[p][0][1], 6)
                item["path"] = p
            entry.update(scored)
        entry["coverage"] = len(keep) / s.listed if s.listed else 0.0
        results["sets"].append(entry)
        if out_dir is not None:
            _atomic_text(out_dir / f"predictions_{s.tag}.jsonl",
                         "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in preds))
            _atomic_text(out_dir / f"missing_{s.tag}.txt", "".join(m + "\n" for m in s.missing + unreadable))
        if verbose and (s.missing or unreadable):
            print(f"{s.tag}: {len(s.missing)} of {s.listed} listed videos missing, {len(unreadable)} unreadable; "
                  f"accuracy is over the {len(keep)} evaluated (list in missing_{s.tag}.txt)",
                  file=sys.stderr, flush=True)
    for name in dict.fromkeys(e["name"] for e in results["sets"]):
        done = [e for e in results["sets"] if e["name"] == name and e["n"] > 0]
        summary = {"splits": len(done)}
        for k in ("top1", "top5"):
            vals = [e[k] for e in done if k in e]
            if vals:
                m, sd = mean_std(vals)
                summary[k] = {"mean": m, "std": sd}
        results["summary"][name] = summary
    table = format_table(results)
    if out_dir is not None:
        from rest_fast.atomic_io import atomic_write_json

        atomic_write_json(out_dir / "results.json", results)
        _atomic_text(out_dir / "table.md", table)
        bad_report.write(out_dir)
        results["out"] = str(out_dir)
    if verbose:
        print(table, end="", flush=True)
    if max_unreadable is not None and len(bad) > max_unreadable * len(unique):
        where = f" (list in {out_dir / 'bad_files.tsv'})" if out_dir is not None else ""
        raise TooManyUnreadable(
            f"{len(bad)} of {len(unique)} videos ({len(bad) / len(unique):.1%}) could not be decoded, more than "
            f"--max-unreadable {max_unreadable:g}{where}; the accuracy is not comparable - fix or remove them, or "
            "raise --max-unreadable")
    return results


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return dev


def _settings(resolved, num_beams=None, max_length=None, min_length=None, prompt=None, num_return=1):
    d = resolved.defaults
    base = CaptionSettings()
    return CaptionSettings(
        prompt=prompt if prompt is not None else d.get("prompt", base.prompt),
        num_beams=num_beams if num_beams is not None else max(d.get("num_beams", base.num_beams), num_return),
        max_length=max_length if max_length is not None else d.get("max_length", base.max_length),
        min_length=min_length if min_length is not None else d.get("min_length", base.min_length),
        num_return=num_return,
    )


def _default_out(resolved, sets: Sequence[EvalSet]) -> Path:
    tag = sets[0].name if len(sets) > 1 or sets[0].split is None else sets[0].tag
    base = resolved.run_dir / "eval" if resolved.kind == "run" else Path("runs") / "eval"
    return base / tag


def evaluate(checkpoint: str, *, protocol: str | None = None, data_root: str | None = None, split=None,
             data: str | None = None, classes: str | None = None, matcher: str = "clip", clip: str | None = None,
             num_beams: int | None = None, max_length: int | None = None, min_length: int | None = None,
             prompt: str | None = None, batch_size: int = 16, num_frames: int | None = None,
             image_size: int | None = None, device: str | None = "auto", out: str | None = None,
             num_workers: int = 0, progress: bool = True, walk: bool = False, verbose: bool = True,
             decoder: str = "auto", max_unreadable: float | None = DEFAULT_MAX_UNREADABLE) -> dict:
    """``rest-fast eval`` as a function: resolve ``checkpoint``, build the sets, caption, CLIP-TAM, write.

    With neither ``protocol`` nor ``data``, a trainer run is evaluated on the labelled set it trained on (the
    demo's clips for a demo run). Settings left ``None`` come from the run (or the paper's defaults).
    Under torchrun or srun each rank captions one block of the videos; rank 0 writes the outputs.
    """
    from rest_fast.run.ranks import close_ranks, init_ranks

    ranks, dev, owned = init_ranks(_device(device))  # under torchrun/srun: one block of the videos per rank
    try:
        return _evaluate(checkpoint, ranks, dev, protocol=protocol, data_root=data_root, split=split, data=data,
                         classes=classes, matcher=matcher, clip=clip, num_beams=num_beams, max_length=max_length,
                         min_length=min_length, prompt=prompt, batch_size=batch_size, num_frames=num_frames,
                         image_size=image_size, out=out, num_workers=num_workers, progress=progress, walk=walk,
                         verbose=verbose and ranks.is_main, decoder=decoder, max_unreadable=max_unreadable)
    finally:
        close_ranks(owned)


def _evaluate(checkpoint: str, ranks, dev: torch.device, *, protocol, data_root, split, data, classes, matcher,
              clip, num_beams, max_length, min_length, prompt, batch_size, num_frames, image_size, out, num_workers,
              progress, walk, verbose, decoder, max_unreadable) -> dict:
    from rest_fast.eval.checkpoint import (
        describe,
        image_size_of,
        load_clip,
        load_model,
        pixel_normalisation,
        resolve_checkpoint,
    )
    from rest_fast.eval.matchers import get_matcher

    resolved = resolve_checkpoint(checkpoint)
    if verbose and resolved.kind == "run":  # say which weights are evaluated (never silently an older epoch)
        note = f" ({resolved.note})" if resolved.note else ""
        print(f"evaluating run {resolved.run_dir} at epoch {resolved.epoch} ({resolved.weights.parent.name}){note}",
              flush=True)
    if protocol is None and data is None:
        if resolved.data is None:
            raise ValueError("pass --protocol NAME --data-root DIR or --data LIST_OR_DIR (only a trainer run "
                             "directory with labelled training data can be evaluated without them)")
        data, data_root = resolved.data, data_root or resolved.data_root
    sets = build_sets(protocol=protocol, data_root=data_root, split=split, data=data, classes=classes, walk=walk)
    decoder = resolve_decoder(decoder, dev, "eval", verbose=verbose, videos=[p for s in sets for p, _ in s.videos])
    settings = _settings(resolved, num_beams, max_length, min_length, prompt)
    settings.validate()
    model = load_model(resolved, dev)
    t = num_frames or resolved.defaults.get("num_frames") or model.num_frames
    size = image_size or resolved.defaults.get("image_size") or image_size_of(model)
    from rest_fast.models.preprocess import check_image_size

    vis = model.blip.config.vision_config
    check_image_size(int(size), int(vis.patch_size), int(vis.image_size))
    mean, std = pixel_normalisation(resolved)
    clip_model = None
    if str(matcher).strip().lower() == "clip":
        clip_model = load_clip(resolved, clip, device=dev, batch_size=max(batch_size, 64))
    text_encoder = get_matcher(matcher, clip=clip_model, device=str(dev))
    out_dir = Path(out) if out is not None else _default_out(resolved, sets)
    info = {"checkpoint": describe(resolved), "protocol": protocol, "data": data,
            "clip": getattr(clip_model, "name", None)}
    return evaluate_model(model, sets, mean=mean, std=std, num_frames=int(t), image_size=int(size),
                          matcher=text_encoder, settings=settings, out=out_dir, batch_size=batch_size, device=dev,
                          num_workers=num_workers, progress=progress, info=info, verbose=verbose, decoder=decoder,
                          max_unreadable=max_unreadable, ranks=ranks)


# ------------------------------------------------------------------------------------------- commands
@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with ``n`` torch intra-op threads (``0``/``None``: leave as is), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        if n < 0:
            raise ValueError(f"threads must be >= 0, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _error(cmd: str, exc: BaseException) -> int:
    from rest_fast.errors import one_line

    print(f"rest-fast {cmd}: error: {one_line(exc)}", file=sys.stderr)
    return 2


def run_eval(args) -> int:
    """The ``rest-fast eval`` command (arguments defined in :mod:`rest_fast.cli`)."""
    from rest_fast.eval.checkpoint import CheckpointError

    try:
        with cpu_threads(args.threads):
            res = evaluate(args.checkpoint, protocol=args.protocol, data_root=args.data_root, split=args.split,
                           data=args.data, classes=args.classes, matcher=args.matcher, clip=args.clip,
                           num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
                           prompt=args.prompt, batch_size=args.batch_size, num_frames=args.num_frames,
                           image_size=args.image_size, device=args.device, out=args.out,
                           num_workers=args.num_workers, progress=not args.no_progress, walk=args.walk,
                           decoder=args.decoder,
                           max_unreadable=getattr(args, "max_unreadable", DEFAULT_MAX_UNREADABLE))
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        return _error("eval", exc)
    if "out" in res:  # rank 0 wrote them
        print(f"results in {res['out']}", file=sys.stderr)
    return 0


def run_caption(args) -> int:
    """The ``rest-fast caption`` command: free-form captions with their beam scores for any video files."""
    with cpu_threads(args.threads):
        return _caption(args)


def _caption(args) -> int:
    from rest_fast.eval.checkpoint import (
        CheckpointError,
        image_size_of,
        load_model,
        pixel_normalisation,
        resolve_checkpoint,
    )

    try:
        resolved = resolve_checkpoint(args.checkpoint)
        settings = _settings(resolved, args.num_beams, args.max_length, args.min_length, args.prompt,
                             args.num_return)
        settings.validate()
        dev = _device(args.device)
        decoder = resolve_decoder(args.decoder, dev, "caption", videos=list(args.videos))
        model = load_model(resolved, dev)
    except (CheckpointError, ValueError) as exc:
        return _error("caption", exc)
    t = args.num_frames or resolved.defaults.get("num_frames") or model.num_frames
    size = args.image_size or resolved.defaults.get("image_size") or image_size_of(model)
    from rest_fast.models.preprocess import check_image_size

    vis = model.blip.config.vision_config
    check_image_size(int(size), int(vis.patch_size), int(vis.image_size))  # one line, not an error per video
    mean, std = pixel_normalisation(resolved)
    results, bad_list = caption_videos(model, list(args.videos), num_frames=int(t), size=int(size), mean=mean, std=std,
                                settings=settings, batch_size=args.batch_size, device=dev,
                                num_workers=args.num_workers, progress=False, decoder=decoder)
    failed = 0
    bad = dict(bad_list)
    for path, res in zip(args.videos, results):
        if res is None:
            failed += 1
            print(f"rest-fast caption: {path}: cannot read: {bad.get(path, 'unknown error')}", file=sys.stderr)
            if args.json:
                print(json.dumps({"video": path, "error": bad.get(path)}), flush=True)
            continue
        if args.json:
            print(json.dumps({"video": path, "captions": [c for c, _ in res],
                              "scores": [round(s, 6) for _, s in res]}, ensure_ascii=False), flush=True)
        else:
            print(path)
            for c, s in res:
                print(f"  {s:8.4f}  {c}")
    return 1 if failed else 0
