"""``rest-fast export RUN --out DIR``: a trained run as a self-contained, Hugging Face-style model folder.

DIR holds everything needed to caption without the run folder::

    config.json, model.safetensors        the BLIP captioner (HF ``save_pretrained``)
    temporal_adapters.safetensors         the temporal adapters' weights
    gar_config.json                       num_frames, adapter layers (read by GARModel.from_pretrained)
    tokenizer.json, tokenizer_config.json, vocab.txt, special_tokens_map.json   the tokenizer
    preprocessor_config.json, processor_config.json    the BLIP processor: frame size and pixel mean/std
    run_config.yaml                       the run's resolved config
    rest_fast_export.json                 marker: the decoding defaults of the run (frames, size, prompt, beams),
                                          the run's CLIP, the epoch exported, and every file written here
    README.md                             a model card: how to load it, the run's CLIP-TAM figures and config

``GARModel.from_pretrained(DIR)``, ``rest-fast caption --checkpoint DIR`` and ``rest-fast eval --checkpoint DIR``
load it with no run folder, and caption with the run's own decoding settings: the tokens are the run's.

The folder is written under a temporary name next to DIR and renamed into place, so DIR exists only complete. An
existing DIR is used only when it is empty or is an earlier export (its marker lists every file in it); anything
else is refused and left untouched. ``--push-to-hub REPO`` then uploads DIR with ``huggingface_hub``; offline
(``HF_HUB_OFFLINE=1``, no network) that is one line, and the exported folder stays.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rest_fast.errors import UserError, one_line

EXPORT_MARKER = "rest_fast_export.json"
EXPORT_FORMAT = "rest_fast.export"
CARD_ROUND_KEYS = (("tam_initial_top1", "frame captioner top-1"), ("tam_pseudo_top1", "pseudo-caption top-1"),
                   ("tam_top1", "generated top-1"), ("tam_top5", "generated top-5"))


def read_export_marker(folder: str | Path) -> dict | None:
    """The marker of an exported folder (``rest_fast_export.json``), or None when ``folder`` is not one."""
    path = Path(folder) / EXPORT_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT else None


def check_out(out: Path) -> bool:
    """Raise :class:`UserError` unless ``out`` is new, an empty folder, or an earlier export holding only the files
    its marker lists. Returns whether ``out`` exists (an earlier export or an empty folder to replace)."""
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"--out {out} exists and is not a plain folder (a file or a link; nothing was changed)")
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return True
    marker = read_export_marker(out)
    ours = set(marker.get("files", [])) | {EXPORT_MARKER} if marker else set()
    foreign = [e for e in entries if e not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--out {out} already holds files that `rest-fast export` did not write ({shown}); pass a new "
                        "or empty folder (nothing in it is changed or deleted)")
    return True


def _run_metrics(run_dir: Path, epoch: int | None) -> tuple[list[dict], dict | None]:
    """(round records, the last epoch record) of the run, up to the exported epoch."""
    from rest_fast.run.rundir import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    limit = epoch if epoch is not None else float("inf")
    rounds = {int(r["round"]): r for r in records
              if r.get("kind") == "round" and isinstance(r.get("round"), int) and int(r.get("epoch", 0)) <= limit}
    epochs = [r for r in records if r.get("kind") == "epoch" and int(r.get("epoch", 0)) <= limit]
    return [rounds[k] for k in sorted(rounds)], (epochs[-1] if epochs else None)


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else ""


def model_card(name: str, marker: dict, config: dict, rounds: list[dict], last_epoch: dict | None) -> str:
    """The README.md of an exported folder (Hugging Face model-card front matter + markdown)."""
    import yaml

    blip = str(config.get("blip", ""))
    front = {"library_name": "rest_fast", "tags": ["rest_fast", "video-captioning", "action-recognition", "blip"]}
    if blip.count("/") == 1 and not os.path.exists(blip):  # a hub id, not a path or a built-in name
        front["base_model"] = blip
    d = marker["defaults"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}: a REST generative action recognizer", "",
             "BLIP captioner with temporal adapters, self-trained with REST (REtrieve & Self-Train) on unlabelled "
             f"videos by `rest_fast`. Exported from run `{marker['run']}` at epoch "
             f"{marker.get('epoch')} of {config.get('epochs')} by `rest-fast export`.", "",
             "## Use", "", "```python", "from rest_fast.models import GARModel", "",
             f'model = GARModel.from_pretrained("{name}")  # BLIP + temporal adapters + tokenizer',
             "# clips: float [B, T, 3, S, S], normalised with preprocessor_config.json's mean/std",
             f'out = model.generate(clips, prompt="{d["prompt"]}", num_beams={d["num_beams"]}, '
             f'max_length={d["max_length"]}, min_length={d["min_length"]})',
             "```", "", "```bash", f"rest-fast caption video.mp4 --checkpoint {name}", "```", "",
             f"Decoding defaults (from the run, in `{EXPORT_MARKER}`): T={d['num_frames']} frames at "
             f"{d['image_size']}x{d['image_size']}, prompt \"{d['prompt']}\", beam width {d['num_beams']}, "
             f"{d['min_length']} to {d['max_length']} tokens.", ""]
    lines += ["## Metrics", ""]
    if rounds and any(k in r for r in rounds for k, _ in CARD_ROUND_KEYS):
        cols = [(k, label) for k, label in CARD_ROUND_KEYS if any(k in r for r in rounds)]
        lines += ["CLIP-TAM accuracy on the run's labelled training videos after each caption round "
                  "(`metrics.jsonl` of the run):", "",
                  "| round | after epoch | " + " | ".join(label for _, label in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        lines += [f"| {r['round']} | {r.get('epoch', '')} | " + " | ".join(_pct(r.get(k)) for k, _ in cols) + " |"
                  for r in rounds]
        lines.append("")
    else:
        lines += ["The run's videos had no labels: no CLIP-TAM accuracy was measured (`rest-fast eval` measures it "
                  "on a labelled set).", ""]
    if last_epoch is not None:
        lines += [f"Self-training loss at epoch {last_epoch.get('epoch')}: {last_epoch.get('loss', float('nan')):.4f}.", ""]
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None) -> Path:
    """Write the export of ``run`` (a run folder or one of its ``checkpoints/epoch_XXXX``) to ``out``; ``name``
    (default: ``out``'s folder name; the hub repo when pushed) is what the model card loads."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading and saving a small folder: HF's bars would be the only output
    try:
        return _export(run, out, name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _export(run: str | os.PathLike, out: str | os.PathLike, name: str | None) -> Path:
    from transformers import BlipImageProcessor, BlipProcessor

    from rest_fast.atomic_io import (
        apply_umask,
        atomic_write_json,
        atomic_write_text,
        fsync_dir,
        make_temp_dir,
    )
    from rest_fast.eval.checkpoint import CheckpointError, load_model, pixel_normalisation, resolve_checkpoint

    out = Path(out).expanduser()
    try:
        resolved = resolve_checkpoint(run)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    if resolved.kind != "run":
        raise UserError(f"{run} is not a `rest-fast train` run folder (config.yaml + checkpoints/) or one of its "
                        "checkpoints/epoch_XXXX folders")
    existed = check_out(out)
    try:
        model = load_model(resolved, "cpu")
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    d = resolved.defaults
    mean, std = pixel_normalisation(resolved)
    epoch = resolved.epoch
    config = dict(resolved.config or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.export-")
    try:
        model.save_pretrained(tmp)
        image_processor = BlipImageProcessor(size={"height": d["image_size"], "width": d["image_size"]},
                                             image_mean=list(mean), image_std=list(std))
        try:
            BlipProcessor(image_processor=image_processor, tokenizer=model.tokenizer).save_pretrained(str(tmp))
        except (TypeError, ValueError):  # a tokenizer class BlipProcessor does not take: the image part alone
            pass
        image_processor.save_pretrained(str(tmp))  # preprocessor_config.json: pixel mean/std and frame size
        atomic_write_text(tmp / "run_config.yaml", (resolved.run_dir / "config.yaml").read_text())
        from rest_fast import __version__

        marker = {"format": EXPORT_FORMAT, "version": 1, "rest_fast_version": __version__,
                  "run": Path(resolved.run_dir).resolve().name, "epoch": epoch,
                  "defaults": dict(d), "pixel_mean": list(mean), "pixel_std": list(std),
                  "clip": config.get("clip"), "clip_pretrained": config.get("clip_pretrained")}
        rounds, last_epoch = _run_metrics(Path(resolved.run_dir), epoch)
        atomic_write_text(tmp / "README.md", model_card(name or out.name, marker, config, rounds, last_epoch))
        files = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        atomic_write_json(tmp / EXPORT_MARKER, {**marker, "files": sorted({*files, EXPORT_MARKER})})
        for f in tmp.iterdir():  # safetensors writes 0600: every file follows the umask, as open() would give
            if f.is_file():
                apply_umask(f)
        fsync_dir(tmp)
        if existed:
            old = make_temp_dir(out.parent, f".{out.name}.old-")
            os.replace(out, old / "export")  # checked above: empty, or only our own files
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return flag


def push_to_hub(folder: Path, repo: str, *, private: bool = False) -> str:
    """Upload ``folder`` to the hub model repo ``repo`` (created if needed); returns its URL. Offline, without
    ``huggingface_hub``, or when the hub cannot be reached: a one-line :class:`UserError`."""
    later = f"the export is in {folder}; upload it later with `hf upload {repo} {folder}`"
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError(f"--push-to-hub needs the huggingface_hub package (pip install huggingface_hub); {later}") from None
    if _offline():
        raise UserError(f"--push-to-hub {repo}: offline (HF_HUB_OFFLINE is set): nothing was uploaded; {later}")
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="rest-fast export")
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors have no common base: all one line
        raise UserError(f"--push-to-hub {repo}: upload failed ({type(exc).__name__}: {one_line(exc)}); {later}") from None
    return str(url)


def run_export(args) -> int:
    """The ``rest-fast export`` command."""
    out = export_run(args.run, args.out, name=args.push_to_hub)
    print(f"exported {args.run} to {out}: load it with GARModel.from_pretrained({str(out)!r}) or "
          f"`rest-fast caption VIDEO --checkpoint {out}`", flush=True)
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"uploaded to {url}", file=sys.stdout, flush=True)
    return 0
