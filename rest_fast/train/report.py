"""Plots and a human-readable report of a run, built from its files alone.

``write_report(run_dir)`` reads ``metrics.jsonl`` and ``captions/round_XX.jsonl`` and writes:

* ``plots/loss.png`` — training loss per logged step (and per epoch);
* ``plots/rounds.png`` — distinct captions in the slots and mean video-text score per round, and
  CLIP-TAM accuracy per round when the videos have labels;
* ``report.html`` — the round table, then for each shown video its frame strip and the evolution of
  its pseudo-captions round by round (the paper's Fig. 4).

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

from rest_fast.run.rundir import atomic_write_bytes, atomic_write_text, read_jsonl


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _rounds(run: Path) -> dict[int, list[dict]]:
    out = {}
    for p in sorted((run / "captions").glob("round_*.jsonl")):
        m = re.fullmatch(r"round_(\d+)", p.stem)
        if m:
            out[int(m.group(1))] = read_jsonl(p)
    return out


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


def write_report(run_dir: str | Path, *, max_videos: int = 24,
                 frames_of: Callable[[int], np.ndarray | None] | None = None) -> Path:
    """Write plots and ``report.html`` for the run at ``run_dir``; return the HTML path.

    ``frames_of(i)`` gives uint8 [T,H,W,3] frames of video ``i`` for its strip (written once to
    ``plots/frames/``); without it, strips already on disk are used.
    """
    run = Path(run_dir)
    metrics = read_jsonl(run / "metrics.jsonl")
    plots = plot_metrics(run, metrics)
    rounds = _rounds(run)
    round_recs = sorted((r for r in metrics if r.get("kind") == "round"), key=lambda r: r["round"])
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>REST run report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}"
             "th{background:#f3f3f3}.video{margin:1.5em 0;border-top:1px solid #ddd;padding-top:.8em}"
             ".score{color:#777;font-size:11px}.gen{color:#246}.note{background:#fff6d6;padding:.6em}",
             "</style></head><body>", f"<h1>REST run: {e(str(run.resolve().name))}</h1>"]
    cfg_path = run / "config.yaml"
    if cfg_path.exists() and "data: null" in cfg_path.read_text():
        from rest_fast.train.demo import DEMO_NOTICE

        parts.append(f"<p class='note'>{e(DEMO_NOTICE)}</p>")
    if round_recs:
        cols = [c for c in ("round", "epoch", "distinct_captions", "mean_score", "mean_top1_score", "new_captions",
                            "cache_size", "tam_top1", "tam_top5", "tam_pseudo_top1", "seconds")
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
    for p in plots:
        parts.append(f"<img src='plots/{e(p.name)}' style='max-width:100%'>")
    if rounds:
        first = rounds[min(rounds)]
        n_show = min(max_videos, len(first))
        parts.append(f"<h2>Caption evolution ({n_show} of {len(first)} videos)</h2>")
        frames_dir = run / "plots" / "frames"
        for i in range(n_show):
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
            if strip.exists():
                parts.append(f"<img src='plots/frames/{e(strip.name)}'>")
            parts.append("<table><tr><th>round</th><th>generated this round</th><th>pseudo-captions (score)</th></tr>")
            for r, recs in sorted(rounds.items()):
                if i >= len(recs):
                    continue
                rec = recs[i]
                caps = "<br>".join(f"{e(c)} <span class='score'>{s:.3f}</span>"
                                   for c, s in zip(rec.get("captions", []), rec.get("scores", [])))
                gen = e(rec.get("generated", "(initial BLIP captions)" if r == 0 else ""))
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
