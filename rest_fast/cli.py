"""The ``rest-fast`` command line.

Each subcommand is a function ``_cmd_<name>(args)`` registered in :func:`build_parser`; the heavy
imports happen inside the command so ``rest-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rest_fast.errors import UserError, one_line, storage_problem

# Ordinary path mistakes surface as these wherever a file is opened; they name the path, so main() reports
# them as one line too. Everything else (a bug) keeps its traceback.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a :class:`UserError` (one line from :func:`main`), not usage + exit."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _cmd_info(args: argparse.Namespace) -> int:
    from rest_fast.info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rest_fast.train.command import run_train

    return run_train(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from rest_fast.eval.run import run_eval

    return run_eval(args)


def _cmd_caption(args: argparse.Namespace) -> int:
    from rest_fast.eval.run import run_caption

    return run_caption(args)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from rest_fast.eval.finetune import run_finetune

    return run_finetune(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from rest_fast.eval.export import run_export

    return run_export(args)


def _cmd_prepare(args: argparse.Namespace) -> int:
    import inspect

    from rest_fast.data.select import choose_decoder
    from rest_fast.data.shards import prepare

    extra = {}
    try:
        choice = choose_decoder(args.decoder)
    except ValueError as exc:
        print(f"rest-fast prepare: error: {exc}", file=sys.stderr)
        return 2
    if "decoder" in inspect.signature(prepare).parameters:
        extra["decoder"] = choice.name
    elif choice.name == "dali":
        if args.decoder == "dali":
            print("rest-fast prepare: error: --decoder dali: prepare decodes with PyAV's robust path only (the "
                  "shards it writes are read with nvJPEG by train/eval --decoder dali); use --decoder pyav or auto",
                  file=sys.stderr)
            return 2
        choice = choice._replace(name="pyav", reason="auto: prepare decodes with PyAV's robust path (its shards are "
                                 "read with nvJPEG by train/eval --decoder dali)")
    elif choice.name == "nvjpeg":  # nvJPEG reads the shards prepare writes; prepare itself decodes videos with PyAV
        choice = choice._replace(name="pyav", reason="prepare decodes with PyAV's robust path (its shards are read "
                                 "with nvJPEG by train/eval --decoder nvjpeg)")
    # inputs checked before anything is printed or written (a mistake is then the only line)
    out = os.path.expanduser(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    _check_prepare_input(args.data, args.data_root)
    print(f"rest-fast prepare: decoder {choice.name} ({choice.reason})", file=sys.stderr, flush=True)
    from rest_fast.run.output_guard import interrupted_prepare, locked_output
    from rest_fast.run.rundir import RunLockedError

    try:
        with locked_output(out, "prepare"):  # one prepare per --out, as one trainer per run folder
            res = prepare(args.data, args.out, frames=args.frames, short_side=args.short_side or None,
                          quality=args.quality, workers=args.workers, shard_size=args.shard_size,
                          data_root=args.data_root, progress=not args.no_progress, **extra)
    except RunLockedError as exc:  # another prepare is writing there: one line
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        import shlex

        again = f"rest-fast prepare --data {shlex.quote(args.data)} --out {shlex.quote(args.out)} (same options)"
        raise UserError(interrupted_prepare(out, again)) from None
    print(f"{res.out}: {res.num_videos} videos in {res.num_shards} shard(s), {res.num_bad} bad "
          f"(bad_files.tsv); {res.decoded_now} decoded in {res.seconds:.1f} s"
          + (f", resumed at video {res.resumed_from}" if res.resumed_from else ""))
    return 0


def _check_prepare_input(data: str, data_root: str | None) -> None:
    """Refuse, before anything is written, a ``--data`` that holds no video prepare could read."""
    import warnings

    from rest_fast.data.index import VideoIndex

    if not os.path.exists(data):
        raise UserError(f"--data {data} does not exist")
    if data_root is not None and not os.path.isdir(data_root):
        raise UserError(f"--data-root {data_root} is not a folder")
    if os.path.isdir(data):
        if os.path.isfile(os.path.join(data, "prepared.json")):
            raise UserError(f"--data {data} is already a prepared folder (train and eval read it as --data)")
        with warnings.catch_warnings():  # prepare itself says it again
            warnings.simplefilter("ignore")
            VideoIndex.from_folder(data)  # raises when it holds no video
        return
    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(data))
    index = VideoIndex.from_list(data, root, skip_missing=True)
    if not len(index):
        raise UserError(f"none of the {len(index.missing)} videos listed in {data} exists under {root} "
                        f"(e.g. {index.missing[0]}); pass --data-root DIR")


def _add_decoder_argument(p) -> None:
    p.add_argument("--decoder", default="auto", metavar="auto|dali|pyav|nvjpeg",
                   help="video decoding: auto (DALI on the GPU when a CUDA device and nvidia-dali are present, else "
                   "torchvision's nvJPEG for prepared shards on a CUDA device, else the CPU path), dali, pyav or "
                   "nvjpeg (default auto; the choice and why are printed)")


def _cmd_plan(args: argparse.Namespace) -> int:
    from rest_fast.plan import run_plan

    return run_plan(args)


def _int_at_least(lo: int, hi: int | None = None):
    """argparse type: an int in ``[lo, hi]`` (the message names the allowed range)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v

    return parse


def _byte_size(text: str) -> str:
    """argparse type for ``--shard-size``: checked here (``1GB``, ``500MB``, a byte count), passed on as given."""
    from rest_fast.data.shards.prepare import parse_size

    try:
        parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 1GB, 500MB or 1e9, got {text!r}") from None
    return text


def _fraction(text: str) -> float:
    """argparse type: a finite number in [0, 1]."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return v


def _add_generation_arguments(p: argparse.ArgumentParser, batch_size: int = 16) -> None:
    """Options shared by eval, caption and finetune: captioner input and beam search (run's values by default)."""
    g = p.add_argument_group("captioning (defaults: the run's settings, else the paper's)")
    g.add_argument("--num-beams", type=_int_at_least(1), help="beam width (default: the run's, else 3)")
    g.add_argument("--max-length", type=int, help="max caption tokens, prompt included (default: run's, else 20)")
    g.add_argument("--min-length", type=int, help="min caption tokens, prompt included (default: run's, else 5)")
    g.add_argument("--prompt", help="decoder prompt (default: the run's train_prompt, else 'a video of')")
    g.add_argument("--num-frames", type=_int_at_least(1), help="T, frames per clip (default: the run's, else the model's)")
    g.add_argument("--image-size", type=_int_at_least(1), help="S, frame size (default: the run's, else the model's)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=batch_size, help=f"videos per forward (default {batch_size})")
    g.add_argument("--num-workers", type=int, default=-1, help="decoding worker processes (default -1: from the "
                   "CPUs available; 0 = in the main process)")
    _add_decoder_argument(g)
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = torch's default; 1 is "
                   "fastest for tiny models on a busy machine)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_match_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP-TAM")
    g.add_argument("--matcher", default="clip", metavar="clip|sentence-transformers[:PATH]",
                   help="text encoder mapping captions to class names (default: CLIP, the paper's CLIP-TAM)")
    g.add_argument("--clip", metavar="NAME", help="CLIP for --matcher clip (default: the run's CLIP, else ViT-B-16 "
                   "openai; 'tiny' = the demo's random CLIP)")
    g.add_argument("--walk", action="store_true", help="also search the whole data root by file name")


def _add_set_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--protocol", help="hmdb51, ucf101, k220, k220-generalized or k400 (with --data-root)")
    g.add_argument("--data-root", metavar="DIR", help="dataset root for --protocol (or root of a --data list)")
    g.add_argument("--data", metavar="LIST_OR_DIR", help="a labelled set: folder of class sub-folders, or a list "
                   "of 'path label' lines (with --classes)")
    g.add_argument("--classes", metavar="FILE", help="class names of a --data list, one a line (or 'index name')")
    g.add_argument("--max-unreadable", type=_fraction, default=0.05, metavar="FRACTION",
                   help="fail (exit 2, results still written) when more than this fraction of the videos to "
                   "evaluate cannot be decoded (default 0.05)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rest-fast",
        description="REST: label-free self-training of a generative action recognizer (BLIP + temporal adapters).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="versions, native extension, Triton, CUDA devices, DALI")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_info.set_defaults(func=_cmd_info)

    from rest_fast.train.command import add_train_arguments

    p_train = sub.add_parser("train", help="REST self-training (Algorithm 1); the CPU demo without --data")
    add_train_arguments(p_train)
    p_train.set_defaults(func=_cmd_train)

    p_eval = sub.add_parser("eval", help="caption a labelled set or protocol, CLIP-TAM top-1/top-5 (mean ± std)",
                            description="Caption every video by beam search, map captions to class names with "
                            "CLIP-TAM, report top-1/top-5 per split and mean ± std; write results.json, table.md, "
                            "per-video predictions_*.jsonl and the missing/unreadable videos to --out.")
    p_eval.add_argument("--checkpoint", required=True, metavar="RUN_OR_DIR",
                        help="a `rest-fast train` run dir (latest checkpoint), a checkpoints/epoch_XXXX folder, "
                        "a save_pretrained dir or an HF hub id")
    _add_set_arguments(p_eval)
    p_eval.add_argument("--split", help="1, 2, 3 or all (default: all splits of the protocol)")
    p_eval.add_argument("--out", metavar="DIR", help="output dir (default: RUN/eval/<set>, else runs/eval/<set>)")
    _add_match_arguments(p_eval)
    _add_generation_arguments(p_eval)
    p_eval.set_defaults(func=_cmd_eval)

    p_cap = sub.add_parser("caption", help="free-form captions with beam scores for any video files")
    p_cap.add_argument("videos", nargs="+", metavar="VIDEO")
    p_cap.add_argument("--checkpoint", default="Salesforce/blip-image-captioning-base", metavar="RUN_OR_DIR",
                       help="run dir, model dir or HF hub id (default: Salesforce/blip-image-captioning-base)")
    p_cap.add_argument("--num-return", type=int, default=1, help="captions per video, best first (default 1)")
    p_cap.add_argument("--json", action="store_true", help="one JSON object per video")
    _add_generation_arguments(p_cap, batch_size=8)
    p_cap.set_defaults(func=_cmd_caption)

    p_ft = sub.add_parser("finetune", help="few-shot (--shots) or supervised (--supervised) fine-tuning with "
                          "class names as captions, then eval",
                          description="Fine-tune the captioner with each video's class name as its caption: "
                          "few-shot on a protocol's 2/4/8/16-shot lists, on each of its 3 train/test splits "
                          "(epochs max(400/M, 30), paper Table 10; top-1/top-5 mean ± std over splits), "
                          "or --supervised on a labelled --data set (the class-label GAR baseline: 60 epochs at "
                          "S=224, Table 10); then evaluate.")
    p_ft.add_argument("--checkpoint", required=True, metavar="RUN_OR_DIR", help="model to start from (as for eval)")
    _add_set_arguments(p_ft)
    p_ft.add_argument("--shots", type=int, help="M = 2, 4, 8 or 16 videos per class (few-shot)")
    p_ft.add_argument("--supervised", action="store_true", help="train on all of --data (class-label baseline)")
    p_ft.add_argument("--split", help="few-shot: the train/test split to run, 1, 2, 3 or all (default all: "
                      "mean ± std); --supervised: the evaluation split of --protocol (default all)")
    p_ft.add_argument("--eval-data", metavar="LIST_OR_DIR", help="labelled set to evaluate on (--supervised)")
    p_ft.add_argument("--eval-classes", metavar="FILE", help="class names of an --eval-data list")
    p_ft.add_argument("--no-eval", action="store_true", help="train only")
    p_ft.add_argument("--out", metavar="DIR", help="output dir: model/, metrics.jsonl, eval/ (default runs/finetune/..)")
    p_ft.add_argument("--resume", choices=["auto"], help="auto: continue an interrupted fine-tuning in --out from its "
                      "last epoch checkpoint (same options; a finished one is left as it is)")
    p_ft.add_argument("--save-every-minutes", type=float, default=30.0, metavar="MIN",
                      help="epoch checkpoint for --resume when MIN minutes passed since the last one, and after the "
                      "last epoch (default 30; 0 = every epoch)")
    t = p_ft.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, help="default: max(400/M, 30) few-shot, 60 supervised (Table 10)")
    t.add_argument("--lr", type=float, default=2e-5, help="peak learning rate, cosine decay (default 2e-5)")
    t.add_argument("--lr-min", type=float, default=2e-8, help="final learning rate (default 2e-8)")
    t.add_argument("--weight-decay", type=float, default=1e-3, help="AdamW weight decay (default 1e-3)")
    t.add_argument("--label-smoothing", type=float, default=0.2, help="(default 0.2)")
    t.add_argument("--train-batch-size", type=int, default=64, help="training batch size (default 64)")
    t.add_argument("--no-augment", action="store_true", help="no Table 10 augmentations")
    t.add_argument("--seed", type=int, default=0)
    _add_match_arguments(p_ft)
    _add_generation_arguments(p_ft)
    p_ft.set_defaults(func=_cmd_finetune)

    p_exp = sub.add_parser("export", help="a trained run as a self-contained HF-style model folder (optionally pushed "
                           "to the hub)",
                           description="Write the run's captioner (BLIP + temporal adapters, safetensors), tokenizer, "
                           "processor, config and a model card with the run's metrics to --out, loadable with "
                           "GARModel.from_pretrained(DIR) and `rest-fast caption --checkpoint DIR` without the run.")
    p_exp.add_argument("run", metavar="RUN", help="a `rest-fast train` run folder (its latest intact checkpoint) or "
                       "one of its checkpoints/epoch_XXXX folders")
    p_exp.add_argument("--out", required=True, metavar="DIR", help="new or empty folder (or an earlier export, "
                       "replaced)")
    p_exp.add_argument("--push-to-hub", metavar="REPO", help="then upload DIR to this Hugging Face model repo "
                       "(needs network and a login)")
    p_exp.add_argument("--private", action="store_true", help="create the hub repo as private")
    p_exp.set_defaults(func=_cmd_export)

    p_prep = sub.add_parser("prepare", help="decode videos once into WebDataset shards of JPEG frames (resumable)",
                            description="Decode every video once (robust path), keep F frames uniformly spaced "
                            "over the decoded frames, resize the shorter side, store JPEGs in WebDataset tar "
                            "shards with index.jsonl and bad_files.tsv. Rerun the same command to resume after a "
                            "kill. train/eval accept the output directory as --data.")
    p_prep.add_argument("--data", required=True, metavar="LIST_OR_DIR",
                        help="folder of class sub-folders, or a list of 'path [label]' lines")
    p_prep.add_argument("--data-root", metavar="DIR", help="root of a --data list's paths (default: its folder)")
    p_prep.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p_prep.add_argument("--frames", type=_int_at_least(1), default=32,
                        help="F, frames kept per video (>= the T used later; 32)")
    p_prep.add_argument("--short-side", type=_int_at_least(0), default=256,
                        help="resize the shorter side to this (0 = keep; 256)")
    p_prep.add_argument("--quality", type=_int_at_least(1, 100), default=90, help="JPEG quality, 1-100 (default 90)")
    p_prep.add_argument("--workers", type=_int_at_least(0), help="decoding processes (default: all CPU cores; "
                        "0 = in this process)")
    p_prep.add_argument("--shard-size", type=_byte_size, default="1GB",
                        help="bytes per shard, e.g. 1GB, 500MB (default 1GB)")
    p_prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_decoder_argument(p_prep)
    p_prep.set_defaults(func=_cmd_prepare)

    from rest_fast.plan import add_plan_arguments

    p_plan = sub.add_parser("plan", help="cost of a run before it starts: FLOPs, time, GPU/host memory, disk",
                            description="From the train config (defaults < --config < key=value) and the data size "
                            "alone (architectures from their configs, no weights): FLOPs per step, step time, "
                            "clips/s needed, epoch and run time, memory per GPU and per rank, shard disk.")
    add_plan_arguments(p_plan)
    p_plan.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An ordinary mistake (:class:`rest_fast.errors.UserError`, or a path that is missing or
    of the wrong kind) prints ONE line ``rest-fast CMD: error: ...`` on stderr and returns 2; set
    ``REST_FAST_DEBUG=1`` to get the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"rest-fast {command}" if command else "rest-fast"
    import warnings

    default_format = warnings.formatwarning

    def one_line_warning(message, category, filename, lineno, line=None):  # our warnings: one line each
        if issubclass(category, UserWarning) and filename.startswith(os.path.dirname(__file__)):
            return f"{prog}: warning: {one_line(str(message))}\n"
        return default_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line_warning
    try:
        return _run(build_parser(), argv)
    except Exception as exc:
        if os.environ.get("REST_FAST_DEBUG") or not _user_facing(exc):
            raise
        msg = storage_problem(exc) or one_line(exc)
        if isinstance(exc, _PATH_ERRORS) and exc.filename is not None and exc.strerror:
            msg = f"{exc.filename}: {exc.strerror}"
        for p in (f"{prog}: ", "rest-fast: "):  # argparse prefixes its messages with the program name
            msg = msg[len(p):] if msg.startswith(p) else msg
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default_format


def _user_facing(exc: BaseException) -> bool:
    """An ordinary problem with the user's input (reported in one line) rather than a bug (a traceback)."""
    if isinstance(exc, (UserError, *_PATH_ERRORS)) or storage_problem(exc) is not None:
        return True
    # too many unreadable videos: the loaders' error (its module is loaded whenever it can have been raised)
    bad_files = sys.modules.get("rest_fast.data.bad_files")
    return bad_files is not None and isinstance(exc, bad_files.TooManyBadFiles)


def _run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # `train` takes key=value overrides anywhere among its flags: argparse alone accepts positionals
    # only in one run, so the ones it leaves over are handed to the command (which validates them).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) not in ("train", "plan") or any(x.startswith("-") or "=" not in x for x in extra):
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (see `rest-fast --help`)")
        args.overrides = [*(args.overrides or []), *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
