"""Plots and a human-readable report of a run, built from its files alone.

``write_report(run_dir)`` reads ``metrics.jsonl`` and ``captions/round_XX.jsonl`` and writes:

* ``plots/loss.png`` — training loss per logged step (and per epoch);
* ``plots/rounds.png`` — distinct captions in the slots and mean video-text score per round, and
  CLIP-TAM accuracy per round when the videos have labels;
* ``plots/accuracy.png`` — when the videos have labels: CLIP-TAM top-1 of the generated captions and of
  the best pseudo-caption per round, against the zero-shot frame captioner (``tam_initial_top1``) and chance;
* ``report.html`` — the round table, then for each shown video (as in the paper's Fig. 4) its frame strip,
  the initial caption of each frame, and round by round its generated caption and pseudo-captions; captions
  holding the video's label phrase are marked in green.

It can be re-run on a finished or interrupted run (``python -m rest_fast.train.report RUN``).
"""

from __future__ import annotations

import html
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rest_fast.run.rundir import atomic_write_bytes, atomic_write_text, iter_jsonl, read_jsonl


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _round_files(run: Path) -> dict[int, Path]:
    out = {}
    for p in sorted((run / "captions").glob("round_*.jsonl")):
        m = re.fullmatch(r"round_(\d+)", p.stem)
        if m:
            out[int(m.group(1))] = p
    return out


def _records_of(path: Path, keep: set[int]) -> dict[int, dict]:
    """Records ``i in keep`` of a JSONL file, read streaming: the report never holds a whole round (issue 20)."""
    return {i: rec for i, rec in enumerate(iter_jsonl(path)) if i in keep}


def plot_metrics(run: Path, metrics: list[dict]) -> list[Path]:
    """Write the loss and per-round plots; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    steps = [r for r in metrics if r.get("kind") == "step"]
    epochs = [r for r in metrics if r.get("kind") == "epoch"]
    rounds = sorted((r for r in metrics if r.get("kind") == "round"), key=lambda r: r["round"])
    if steps or epochs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if steps:
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.7, label="logged steps")
        if epochs:
            ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
        ax.set_xlabel("step")
        ax.set_ylabel("captioning loss")
        ax.set_title("self-training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        _savefig(fig, run / "plots" / "loss.png")
        plt.close(fig)
        written.append(run / "plots" / "loss.png")
    if any("tam_top1" in r or "tam_pseudo_top1" in r for r in rounds):
        written.append(_plot_accuracy(run, rounds, plt))
    if rounds:
        has_tam = any("tam_pseudo_top1" in r or "tam_top1" in r for r in rounds)
        ncols = 3 if has_tam else 2
        fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.2))
        x = [r["round"] for r in rounds]
        axes[0].plot(x, [r.get("distinct_captions", np.nan) for r in rounds], "o-")
        axes[0].set_title("distinct captions in slots")
        axes[1].plot(x, [r.get("mean_score", np.nan) for r in rounds], "o-", label="mean of K")
        axes[1].plot(x, [r.get("mean_top1_score", np.nan) for r in rounds], "s--", label="top-1")
        axes[1].set_title("video-text score (CLIP)")
        axes[1].legend()
        if has_tam:
            for key, label in (("tam_top1", "generated, top-1"), ("tam_top5", "generated, top-5"),
                               ("tam_pseudo_top1", "best pseudo-caption, top-1")):
                xs = [r["round"] for r in rounds if key in r]
                if xs:
                    axes[2].plot(xs, [100 * r[key] for r in rounds if key in r], "o-", label=label)
            axes[2].set_title("CLIP-TAM accuracy (%)")
            axes[2].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.set_xticks(x)
        fig.tight_layout()
        _savefig(fig, run / "plots" / "rounds.png")
        plt.close(fig)
        written.append(run / "plots" / "rounds.png")
    return written


def _plot_accuracy(run: Path, rounds: list[dict], plt) -> Path:
    """CLIP-TAM top-1 per round: generated captions, best pseudo-caption, the frame captioner, chance."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    x = [r["round"] for r in rounds]
    for key, label, style in (("tam_top1", "GAR generated caption", "o-"),
                              ("tam_pseudo_top1", "best pseudo-caption (CLIP re-ranked)", "s--")):
        xs = [r["round"] for r in rounds if key in r]
        if xs:
            ax.plot(xs, [100 * r[key] for r in rounds if key in r], style, label=label)
    init = [r["tam_initial_top1"] for r in rounds if "tam_initial_top1" in r]
    if init:
        ax.axhline(100 * init[0], color="tab:red", ls=":", label="zero-shot frame captioner (middle frame)")
    n_classes = _num_classes(run)
    if n_classes:
        ax.axhline(100 / n_classes, color="gray", ls="-.", lw=0.8, label=f"chance (1/{n_classes})")
    ax.set_ylim(0, 100)
    ax.set_xticks(x)
    ax.set_xlabel("round")
    ax.set_ylabel("CLIP-TAM top-1 (%)")
    ax.set_title("action accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path = run / "plots" / "accuracy.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def _num_classes(run: Path) -> int:
    return len({r["label"] for r in iter_jsonl(run / "captions" / "round_00.jsonl") if "label" in r})


def _mark(caption: str, phrase: str | None) -> str:
    """HTML of a caption; green when it holds the label's phrase (underscores read as spaces)."""
    text = html.escape(caption)
    if phrase and phrase in caption.lower():
        return f"<span class='ok'>{text}</span>"
    return text


def _strip_png(frames: np.ndarray, height: int = 96) -> bytes:
    """uint8 [T,H,W,3] → one PNG with the frames side by side, ``height`` pixels high."""
    from PIL import Image

    frames = np.asarray(frames, dtype=np.uint8)
    strip = np.concatenate(list(frames), axis=1)
    img = Image.fromarray(strip)
    scale = height / img.height
    img = img.resize((max(1, int(img.width * scale)), height), Image.NEAREST if scale >= 1 else Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _frames_in_strip(strip: Path) -> int:
    """Frames in a strip PNG (square frames side by side), 0 when there is none."""
    if not strip.exists():
        return 0
    from PIL import Image

    with Image.open(strip) as img:
        return max(1, round(img.width / img.height))


def _videos_to_show(records, n: int) -> list[int]:
    """Indices of the ``n`` videos the report shows: taken in turn from each class when the records carry labels
    (so a labelled set shows every class, not the first class's ``n`` videos), else the first ``n``. ``records``
    may be any iterable (a file read streaming): at most ``n`` indices per class are kept."""
    by_label: dict[str, list[int]] = {}
    labelled = None
    count = 0
    for i, rec in enumerate(records):
        count += 1
        if labelled is None:
            labelled = "label" in rec
        q = by_label.setdefault(str(rec.get("label")) if labelled else "", [])
        if len(q) < n:
            q.append(i)
    if not labelled:
        return list(range(min(n, count)))
    queues = list(by_label.values())
    records = range(count)
    shown: list[int] = []
    depth = 0
    while len(shown) < min(n, len(records)):
        shown += [q[depth] for q in queues if depth < len(q)][: n - len(shown)]
        depth += 1
    return sorted(shown)


def write_report(run_dir: str | Path, *, max_videos: int = 24,
                 frames_of: Callable[[int], np.ndarray | None] | None = None) -> Path:
    """Write plots and ``report.html`` for the run at ``run_dir``; return the HTML path.

    ``frames_of(i)`` gives uint8 [T,H,W,3] frames of video ``i`` for its strip (written once to
    ``plots/frames/``); without it, strips already on disk are used.
    """
    run = Path(run_dir)
    metrics = read_jsonl(run / "metrics.jsonl")
    plots = plot_metrics(run, metrics)
    round_files = _round_files(run)
    round_recs = sorted((r for r in metrics if r.get("kind") == "round"), key=lambda r: r["round"])
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>REST run report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}"
             "th{background:#f3f3f3}.video{margin:1.5em 0;border-top:1px solid #ddd;padding-top:.8em}"
             ".score{color:#777;font-size:11px}.gen{color:#246}.note{background:#fff6d6;padding:.6em}"
             ".ok{color:#080;font-weight:bold}.frames td{text-align:center;font-size:12px}",
             "</style></head><body>", f"<h1>REST run: {e(str(run.resolve().name))}</h1>"]
    cfg_path = run / "config.yaml"
    if cfg_path.exists() and "data: null" in cfg_path.read_text():
        import yaml

        from rest_fast.train.demo import demo_notice

        blip = (yaml.safe_load(cfg_path.read_text()) or {}).get("blip", "")
        parts.append(f"<p class='note'>{e(demo_notice(str(blip)))}</p>")
    if round_recs:
        cols = [c for c in ("round", "epoch", "distinct_captions", "mean_score", "mean_top1_score", "new_captions",
                            "cache_size", "tam_initial_top1", "tam_top1", "tam_top5", "tam_pseudo_top1", "seconds")
                if any(c in r for r in round_recs)]
        parts.append("<h2>Rounds</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for r in round_recs:
            cells = []
            for c in cols:
                v = r.get(c, "")
                if isinstance(v, float):
                    v = f"{100 * v:.1f}%" if c.startswith("tam") else f"{v:.4g}"
                cells.append(f"<td>{e(str(v))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    for p in sorted(plots, key=lambda p: p.name != "accuracy.png"):  # the accuracy plot first
        parts.append(f"<img src='plots/{e(p.name)}' style='max-width:100%;height:260px'>")
    if round_files:
        first_file = round_files[min(round_files)]
        shown = _videos_to_show(iter_jsonl(first_file), max_videos)
        total = sum(1 for _ in iter_jsonl(first_file))
        rounds = {r: _records_of(p, set(shown)) for r, p in round_files.items()}
        first = rounds[min(rounds)]
        parts.append(f"<h2 id='videos'>Caption evolution ({len(shown)} of {total} videos)</h2>")
        frames_dir = run / "plots" / "frames"
        initial = {i: rec.get("captions", []) for i, rec in
                   _records_of(run / "captions" / "initial.jsonl", set(shown)).items()}
        for i in shown:
            rec0 = first[i]
            strip = frames_dir / f"video_{i:05d}.png"
            if not strip.exists() and frames_of is not None:
                try:
                    fr = frames_of(i)
                except Exception:  # noqa: BLE001 - a video that fails to decode gets no strip
                    fr = None
                if fr is not None:
                    atomic_write_bytes(strip, _strip_png(fr))
            label = f" — label: <b>{e(rec0['label'])}</b>" if "label" in rec0 else ""
            parts.append(f"<div class='video'><div><code>{e(rec0.get('video', str(i)))}</code>{label}</div>")
            phrase = rec0["label"].replace("_", " ").lower() if "label" in rec0 else None
            if strip.exists():
                parts.append(f"<img src='plots/frames/{e(strip.name)}'>")
            if initial.get(i):
                caps0 = initial[i]
                n_frames = _frames_in_strip(strip) or len(caps0)
                per = max(1, len(caps0) // max(1, n_frames))
                cells = "".join(f"<td>frame {f}<br>{'<br>'.join(_mark(c, phrase) for c in caps0[f * per:(f + 1) * per])}</td>"
                                for f in range(len(caps0) // per))
                parts.append(f"<table class='frames'><tr><th>initial frame captions</th>{cells}</tr></table>")
            parts.append("<table><tr><th>round</th><th>generated this round</th><th>pseudo-captions (score)</th></tr>")
            for r, recs in sorted(rounds.items()):
                if i not in recs:
                    continue
                rec = recs[i]
                caps = "<br>".join(f"{_mark(c, phrase)} <span class='score'>{s:.3f}</span>"
                                   for c, s in zip(rec.get("captions", []), rec.get("scores", [])))
                gen = (_mark(rec["generated"], phrase) if "generated" in rec
                       else e("(initial frame captions, re-ranked)" if r == 0 else ""))
                parts.append(f"<tr><td>{r}</td><td class='gen'>{gen}</td><td>{caps}</td></tr>")
            parts.append("</table></div>")
    parts.append("</body></html>")
    out = run / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out


if __name__ == "__main__":  # python -m rest_fast.train.report RUN_DIR
    if len(sys.argv) != 2:
        print("usage: python -m rest_fast.train.report RUN_DIR", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps({"report": str(write_report(sys.argv[1]))}))
