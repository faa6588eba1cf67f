"""Where a run's metric records go: ``metrics.jsonl`` always, TensorBoard and W&B when ``log_to`` names them.

One interface, :class:`MetricSink` (``log(record)``, ``log_captions(round, rows)``, ``close()``), and one fan-out,
:class:`MetricsLog`, that the trainer hands every record to (rank 0 only). The records are the ones
``metrics.jsonl`` holds — ``{"kind": "step"|"epoch"|"round"|..., ...}`` — so a dashboard shows exactly what the
file says:

=========  ======================================================================  ====================
kind       dashboard tags (every numeric field but the bookkeeping ones)          x axis
=========  ======================================================================  ====================
step       ``train/loss``, ``train/lr``, ``train/grad_norm``,                       ``step`` (optimiser)
           ``train/clips_per_second``, ``train/data_wait_fraction``, ``train/gpu_memory_gb``
epoch      ``epoch/loss``, ``epoch/clips_per_second``, ``epoch/data_wait_fraction``  ``epoch``
round      ``round/tam_top1``, ``round/tam_pseudo_top1``, ``round/mean_score``, ...   ``round``
=========  ======================================================================  ====================

plus, per caption round, a table of sample captions (video, label, pseudo-captions, generated caption).

The dashboard packages are optional extras (``pip install 'rest_fast[tensorboard]'`` / ``'rest_fast[wandb]'``) and
imported only when asked for; :func:`check_available` says in one line which one is missing, before a run starts.
``metrics.jsonl`` stays the record of the run: a dashboard that fails while training (a full disk, a W&B outage)
is warned about once and dropped, never allowed to stop the run. W&B follows its own environment
(``WANDB_MODE=offline`` writes the run under ``RUN/wandb/`` to ``wandb sync`` later; ``WANDB_PROJECT``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from rest_fast.errors import UserError

SINKS = ("tensorboard", "wandb")
# the import each sink needs, and the extra that installs it
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
_PREFIX = {"step": "train", "epoch": "epoch", "round": "round"}
_AXIS = {"step": "step", "epoch": "epoch", "round": "round"}
_BOOKKEEPING = {"kind", "time", "step", "epoch", "round", "step_in_epoch"}
CAPTION_COLUMNS = ("video", "label", "pseudo_captions", "generated")


def parse_log_to(values: Sequence[str] | str | None) -> list[str]:
    """``log_to`` as a list of sink names: items may hold comma lists (``log_to=tensorboard,wandb``); an unknown
    name is a :class:`UserError` naming the known ones."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for item in values:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in SINKS:
                raise UserError(f"log_to: unknown sink {name!r}; known: {', '.join(SINKS)}")
            if name not in out:
                out.append(name)
    return out


def check_available(values: Sequence[str] | str | None) -> list[str]:
    """The sink names of ``log_to``; raises a one-line :class:`UserError` when a named sink's package is missing
    (checked without importing it, so a run refuses before it writes anything)."""
    names = parse_log_to(values)
    for name in names:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"log_to: {name} needs the {module!r} package, which is not installed: "
                            f"pip install 'rest_fast[{extra}]' (or drop {name} from log_to)")
    return names


def scalars(record: dict) -> tuple[str, int, dict[str, float]] | None:
    """``(axis name, x, {tag: value})`` of a step/epoch/round record: its finite numeric fields under the
    kind's prefix; None for other kinds (``start``) or a record without its axis value."""
    kind = record.get("kind")
    if kind not in _PREFIX or not isinstance(record.get(_AXIS[kind]), (int, float)):
        return None
    values = {}
    for key, value in record.items():
        if key in _BOOKKEEPING or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            values[f"{_PREFIX[kind]}/{key}"] = float(value)
    return _AXIS[kind], int(record[_AXIS[kind]]), values


def caption_rows(records: Sequence[dict], limit: int) -> list[list[str]]:
    """Rows of the sample-captions table (:data:`CAPTION_COLUMNS`) from ``captions/round_XX.jsonl`` records."""
    rows = []
    for rec in list(records)[:limit]:
        rows.append([str(rec.get("video", "")), str(rec.get("label", "")), " | ".join(rec.get("captions", [])),
                     str(rec.get("generated", ""))])
    return rows


class MetricSink:
    """One destination of the run's records. ``required`` sinks (``metrics.jsonl``) raise on failure; others are
    dropped with a warning."""

    name = "sink"
    required = False

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def log_captions(self, round_index: int, rows: list[list[str]]) -> None:
        """A table of sample captions after caption round ``round_index`` (rows of :data:`CAPTION_COLUMNS`)."""

    def close(self) -> None:
        """Flush and release (idempotent)."""


class JsonlSink(MetricSink):
    """``RUN/metrics.jsonl``: one fsynced line per record (:meth:`RunDir.append_metric`)."""

    name = "metrics.jsonl"
    required = True

    def __init__(self, run_dir) -> None:
        self.run_dir = run_dir

    def log(self, record: dict) -> None:
        self.run_dir.append_metric(record)


class TensorBoardSink(MetricSink):
    """TensorBoard event files under ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, config: dict | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if config:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, record: dict) -> None:
        got = scalars(record)
        if got is None:
            return
        _, x, values = got
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, x)
        if record.get("kind") != "step":
            self.writer.flush()  # epochs and rounds are rare: make them visible at once

    def log_captions(self, round_index: int, rows: list[list[str]]) -> None:
        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(CAPTION_COLUMNS) + " |", "|" + "---|" * len(CAPTION_COLUMNS)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        self.writer.add_text("captions", "\n".join(lines), round_index)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink(MetricSink):
    """A W&B run (``wandb.init(dir=RUN)``), resumed under the same id when the trainer resumes.

    Each kind's tags are plotted against its own axis (``train/step``, ``epoch/epoch``, ``round/round``: W&B's
    ``define_metric``), so a resumed run that repeats a step does not fight W&B's monotonic step counter."""

    name = "wandb"

    def __init__(self, root: str | Path, config: dict | None = None) -> None:
        import os

        import wandb

        self.wandb = wandb
        root = Path(root)
        id_file = root / "wandb_run.json"
        run_id = None
        if id_file.is_file():
            try:
                run_id = json.loads(id_file.read_text()).get("id")
            except (ValueError, AttributeError):
                run_id = None
        if not isinstance(run_id, str) or not run_id.isalnum():
            import secrets

            run_id = secrets.token_hex(4)  # W&B's id format: lowercase letters and digits
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rest_fast"), dir=str(root), name=root.name,
                              id=run_id, resume="allow", config=config or {})
        from rest_fast.run.rundir import atomic_write_json

        atomic_write_json(id_file, {"id": run_id})
        for kind, prefix in _PREFIX.items():
            axis = f"{prefix}/{_AXIS[kind]}"
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}/*", step_metric=axis)

    def log(self, record: dict) -> None:
        got = scalars(record)
        if got is None:
            return
        axis, x, values = got
        prefix = _PREFIX[record["kind"]]
        self.run.log({f"{prefix}/{axis}": x, **values})

    def log_captions(self, round_index: int, rows: list[list[str]]) -> None:
        table = self.wandb.Table(columns=list(CAPTION_COLUMNS), data=rows)
        self.run.log({"round/round": round_index, "round/captions": table})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_sink(name: str, root: str | Path, config: dict | None = None) -> MetricSink:
    """The dashboard sink ``name`` writing under the run folder ``root``."""
    if name == "tensorboard":
        return TensorBoardSink(Path(root) / "tensorboard", config)
    if name == "wandb":
        return WandbSink(root, config)
    raise UserError(f"log_to: unknown sink {name!r}; known: {', '.join(SINKS)}")


class MetricsLog:
    """Every record of a run, to every sink: ``metrics.jsonl`` first (it must succeed), then the dashboards.

    ``MetricsLog.open(run_dir, log_to, config)`` on rank 0; ``MetricsLog([])`` (no sinks) elsewhere.
    A dashboard that cannot start or fails later is reported once (a warning and a line on stdout) and dropped.
    """

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = list(sinks)

    @classmethod
    def open(cls, run_dir, log_to: Sequence[str] | str | None = (), config: dict | None = None) -> MetricsLog:
        sinks: list[MetricSink] = [JsonlSink(run_dir)]
        for name in check_available(log_to):
            try:
                sinks.append(open_sink(name, run_dir.root, config))
            except Exception as exc:  # noqa: BLE001 - a dashboard must not stop the run
                _say(f"log_to: {name} could not start ({type(exc).__name__}: {_first_line(exc)}); not logging to it "
                     "(W&B without a login: set WANDB_MODE=offline)")
        return cls(sinks)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sinks]

    def write(self, record: dict) -> None:
        self._each(lambda s: s.log(record))

    def captions(self, round_index: int, records: Sequence[dict], limit: int = 16) -> None:
        if any(not s.required for s in self.sinks):
            rows = caption_rows(records, limit)
            self._each(lambda s: s.log_captions(round_index, rows))

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for s in sinks:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - closing a dashboard must not fail the run's end
                _say(f"log_to: {s.name} did not close cleanly ({type(exc).__name__}: {_first_line(exc)})")

    def _each(self, call) -> None:
        for s in list(self.sinks):
            if s.required:
                call(s)
                continue
            try:
                call(s)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                self.sinks.remove(s)
                _say(f"log_to: {s.name} failed ({type(exc).__name__}: {_first_line(exc)}); no longer logging to it "
                     "(metrics.jsonl still holds every record)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _say(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(f"warning: {msg}", flush=True)


__all__ = ["SINKS", "MetricSink", "JsonlSink", "TensorBoardSink", "WandbSink", "MetricsLog", "parse_log_to",
           "check_available", "scalars", "caption_rows", "open_sink", "CAPTION_COLUMNS"]
