"""``rest-fast train``: arguments derived from :class:`~rest_fast.run.config.TrainConfig`, and the command.

Every config field is a kebab-case flag (``--num-frames 8``), a ``key=value`` positional override
(``num_frames=8``) and a YAML key, with the field's documentation as its help. Imports stay light
(no torch) so ``rest-fast --help`` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from rest_fast.run.config import (
    DEMO_PRESET,
    TrainConfig,
    config_fields,
    load_run_config,
    parse_key_values,
    repeated_keys,
    resolve_config,
    resume_config,
)

_DESCRIPTION = """\
REST self-training (Algorithm 1): initial BLIP captions per frame and prompt, frozen-CLIP retrieval
of pseudo-captions among the H nearest videos, R epochs of captioning loss, a new caption per video
by beam search, re-ranking, ... until `epochs` epochs. Without --data it runs the built-in demo: REST on
a synthetic action world with a tiny pretrained BLIP (an image captioner) and CLIP, where the generated
captions' accuracy climbs well above the frame captioner's (blip=tiny clip=tiny: random-init models).

Precedence: defaults < demo preset (no --data) < --config FILE.yaml < flags and key=value overrides.
Under torchrun (`torchrun --standalone --nproc-per-node N -m rest_fast train ...`) it trains with DDP."""

_EPILOG = """\
examples:
  rest-fast train                                   # the CPU demo (synthetic world), run dir runs/demo
  rest-fast train --data train.txt data_root=/videos --blip Salesforce/blip-image-captioning-base \\
      --clip ViT-B-16 --out runs/k400
  rest-fast train --out runs/k400 --resume auto     # continue after the last complete epoch
  torchrun --standalone --nproc-per-node 8 -m rest_fast train --config k400.yaml   # 8 GPUs, DDP
  rest-fast train --print-config --data train.txt > k400.yaml                   # a config to edit
"""


def _is_list(tp) -> bool:
    return typing.get_origin(tp) is list


def _is_bool(tp) -> bool:
    return tp is bool


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--resume``, the ``key=value`` positional and one flag per config field."""
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. epochs=20 prompts='[a video of, someone is]'")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue the run in --out from its last complete epoch (or start it); "
                             "PATH: a run directory or one of its checkpoints/epoch_XXXX folders")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_fields():
        g = f.metadata.get("group", "config")
        if g not in groups:
            groups[g] = parser.add_argument_group(f"{g} options")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        demo = f"; demo: {DEMO_PRESET[f.name]!r}" if f.name in DEMO_PRESET else ""
        help_ = f"{f.metadata.get('help', '')} (default: {default!r}{demo})".replace("%", "%%")
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        dest = f"cfg__{f.name}"
        if _is_bool(tp):
            groups[g].add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_)
        elif _is_list(tp):
            groups[g].add_argument(flag, dest=dest, nargs="+", metavar="V", default=argparse.SUPPRESS, help=help_)
        else:
            groups[g].add_argument(flag, dest=dest, metavar=f.name.upper(), default=argparse.SUPPRESS, help=help_)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve the config: defaults, demo preset, ``--config``, then flags and ``key=value`` overrides.

    With ``--resume`` on an existing run the run's saved ``config.yaml`` is the base instead (no demo
    preset), and the options given may change only runtime keys (:func:`resume_config`)."""
    overrides: dict = parse_key_values(list(args.overrides or []))
    import sys

    for note in repeated_keys(list(args.overrides or [])):  # the last wins; say so once
        print(f"rest-fast train: note: {note}", file=sys.stderr)
    for k, v in vars(args).items():
        if k.startswith("cfg__"):
            overrides[k[5:]] = v
    cfg = resolve_config(yaml_file=args.config, overrides=overrides)
    root = _resume_root(getattr(args, "resume", None), cfg.out)
    if root is None:
        return cfg
    saved = load_run_config(root / "config.yaml")
    overrides.pop("out", None)  # the run folder is where the run is
    return resume_config(saved, yaml_file=args.config, overrides=overrides).replace(out=str(root))


def _resume_root(resume: str | None, out: str):
    """The folder of the run ``--resume`` continues, when it holds one (its config.yaml)."""
    from pathlib import Path

    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        root = Path(out)
    else:
        p = Path(resume)
        root = p.parent.parent if p.parent.name == "checkpoints" else p
    # a run's config.yaml is the base whether or not a state.json exists (a run stopped before its first state
    # is still that run: never the demo preset, never another config)
    return root if (root / "config.yaml").is_file() else None


def run_train(args: argparse.Namespace) -> int:
    import sys

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"rest-fast train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if cfg.decoder.strip().lower() == "dali":  # fail before any work when DALI is asked for and absent
        from rest_fast.data.select import dali_status

        ok, why = dali_status()
        if not ok:
            print(f"rest-fast train: error: decoder=dali: {why}; pip install -e '.[dali]' or use --decoder pyav",
                  file=sys.stderr)
            return 2
    from rest_fast.train.preflight import check_device, check_model_paths

    check_device(cfg.device)  # before anything is written: no run folder for a device this machine lacks
    check_model_paths(cfg)  # nor for a mistyped local model folder (never sent to the hub)
    from rest_fast.run.rundir import (
        CheckpointCorrupt,
        ForeignFolderError,
        RunLockedError,
        UnsafePath,
        VideoListChanged,
    )
    from rest_fast.train.loop import RunExistsError, train
    from rest_fast.train.preempt import Preempted

    out_given = getattr(args, "cfg__out", None) is not None or "out" in parse_key_values(list(args.overrides or []))
    if cfg.is_demo and args.resume is None and not out_given:
        # Running the demo again starts a new demo run beside the finished one (never over it).
        cfg = dataclasses.replace(cfg, out=_next_free_dir(cfg.out))
    from pathlib import Path

    from rest_fast.errors import UserError, storage_problem
    from rest_fast.run.output_guard import interrupted_train

    fresh = not Path(cfg.out).exists()
    try:
        train(cfg, resume=args.resume)
    except (RunExistsError, RunLockedError, ForeignFolderError, CheckpointCorrupt, VideoListChanged, UnsafePath) as exc:
        print(f"rest-fast train: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # a checkpoint was written: exit 75 tells a job script to resubmit with --resume auto
        import os

        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says so
            print(f"rest-fast train: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C: where the run stands and how to continue, in one line
        raise UserError(interrupted_train(_run_folder(cfg, args.resume))) from None
    except Exception as exc:
        problem = storage_problem(exc)  # read-only folder, full disk, file-size limit: one line, nothing lost
        if problem is None:
            raise
        root = _run_folder(cfg, args.resume)
        if fresh and not (root / "state.json").exists():
            from rest_fast.train.loop import _discard_failed_start

            _discard_failed_start(root)  # a start that got nowhere leaves no half-made folder
            raise UserError(problem) from None
        raise UserError(f"{problem}; {interrupted_train(root, verb='stopped')}") from None
    return 0


def _run_folder(cfg, resume: str | None):
    """The folder the run lives in (``--resume PATH`` names it, else ``out``)."""
    from pathlib import Path

    from rest_fast.train.loop import run_root

    try:
        return run_root(cfg, resume)[0]
    except (OSError, ValueError):
        return Path(cfg.out)


def _next_free_dir(path: str) -> str:
    """``path`` if it holds no run yet, else the first of ``path-2``, ``path-3``, ... that does not."""
    from pathlib import Path

    candidate, n = Path(path), 1
    while (candidate / "state.json").exists() or (candidate / "config.yaml").exists():
        n += 1
        candidate = Path(f"{path}-{n}")
    return str(candidate)
