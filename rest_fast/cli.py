"""The ``rest-fast`` command line.

Each subcommand is a function ``_cmd_<name>(args)`` registered in :func:`build_parser`; the heavy
imports happen inside the command so ``rest-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


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
    print(f"rest-fast prepare: decoder {choice.name} ({choice.reason})", file=sys.stderr, flush=True)
    res = prepare(args.data, args.out, frames=args.frames, short_side=args.short_side or None, quality=args.quality,
                  workers=args.workers, shard_size=args.shard_size, data_root=args.data_root,
                  progress=not args.no_progress, **extra)
    print(f"{res.out}: {res.num_videos} videos in {res.num_shards} shard(s), {res.num_bad} bad "
          f"(bad_files.tsv); {res.decoded_now} decoded in {res.seconds:.1f} s"
          + (f", resumed at video {res.resumed_from}" if res.resumed_from else ""))
    return 0


def _add_decoder_argument(p) -> None:
    p.add_argument("--decoder", default="auto", metavar="auto|dali|pyav",
                   help="video decoding: auto (DALI on the GPU when a CUDA device and nvidia-dali are present, else "
                   "the CPU path), dali or pyav (default auto; the choice and why are printed)")


def _cmd_plan(args: argparse.Namespace) -> int:
    from rest_fast.plan import run_plan

    return run_plan(args)


def _add_generation_arguments(p: argparse.ArgumentParser, batch_size: int = 16) -> None:
    """Options shared by eval, caption and finetune: captioner input and beam search (run's values by default)."""
    g = p.add_argument_group("captioning (defaults: the run's settings, else the paper's)")
    g.add_argument("--num-beams", type=int, help="beam width (default: the run's, else 3)")
    g.add_argument("--max-length", type=int, help="max caption tokens, prompt included (default: run's, else 20)")
    g.add_argument("--min-length", type=int, help="min caption tokens, prompt included (default: run's, else 5)")
    g.add_argument("--prompt", help="decoder prompt (default: the run's train_prompt, else 'a video of')")
    g.add_argument("--num-frames", type=int, help="T, frames per clip (default: the run's, else the model's)")
    g.add_argument("--image-size", type=int, help="S, frame size (default: the run's, else the model's)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"videos per forward (default {batch_size})")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
                          "few-shot on a protocol's 2/4/8/16-shot list (epochs max(400/M, 30), paper Table 10), "
                          "or --supervised on a labelled --data set (the class-label GAR baseline); then evaluate.")
    p_ft.add_argument("--checkpoint", required=True, metavar="RUN_OR_DIR", help="model to start from (as for eval)")
    _add_set_arguments(p_ft)
    p_ft.add_argument("--shots", type=int, help="M = 2, 4, 8 or 16 videos per class (few-shot)")
    p_ft.add_argument("--supervised", action="store_true", help="train on all of --data (class-label baseline)")
    p_ft.add_argument("--split", help="evaluation split of --protocol for --supervised (default: all)")
    p_ft.add_argument("--eval-data", metavar="LIST_OR_DIR", help="labelled set to evaluate on (--supervised)")
    p_ft.add_argument("--eval-classes", metavar="FILE", help="class names of an --eval-data list")
    p_ft.add_argument("--no-eval", action="store_true", help="train only")
    p_ft.add_argument("--out", metavar="DIR", help="output dir: model/, metrics.jsonl, eval/ (default runs/finetune/..)")
    t = p_ft.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, help="default: max(400/M, 30) few-shot, 10 supervised")
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

    p_prep = sub.add_parser("prepare", help="decode videos once into WebDataset shards of JPEG frames (resumable)",
                            description="Decode every video once (robust path), keep F frames uniformly spaced "
                            "over the decoded frames, resize the shorter side, store JPEGs in WebDataset tar "
                            "shards with index.jsonl and bad_files.tsv. Rerun the same command to resume after a "
                            "kill. train/eval accept the output directory as --data.")
    p_prep.add_argument("--data", required=True, metavar="LIST_OR_DIR",
                        help="folder of class sub-folders, or a list of 'path [label]' lines")
    p_prep.add_argument("--data-root", metavar="DIR", help="root of a --data list's paths (default: its folder)")
    p_prep.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p_prep.add_argument("--frames", type=int, default=32, help="F, frames kept per video (>= the T used later; 32)")
    p_prep.add_argument("--short-side", type=int, default=256, help="resize the shorter side to this (0 = keep; 256)")
    p_prep.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p_prep.add_argument("--workers", type=int, help="decoding processes (default: all CPU cores)")
    p_prep.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 1GB, 500MB (default 1GB)")
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
    parser = build_parser()
    # `train` takes key=value overrides anywhere among its flags: argparse alone accepts positionals
    # only in one run, so the ones it leaves over are handed to the command (which validates them).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) not in ("train", "plan") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
