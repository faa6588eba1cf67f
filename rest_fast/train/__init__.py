"""REST self-training (Algorithm 1 of the paper), one module per step.

* :mod:`~rest_fast.run.config` — :class:`TrainConfig`, the single source of truth (YAML, ``key=value``, ``--help``)
* :mod:`~rest_fast.train.initial_captions` — W̃_i: BLIP on each of the T frames with each of the P prompts
* :mod:`~rest_fast.train.features` — frozen-CLIP video features (once, cached) and caption features (new ones only)
* :mod:`~rest_fast.train.neighbours` — Ω: the H nearest videos, self excluded (once, cached)
* :mod:`~rest_fast.train.retrieval_update` — Eqs. 5–6: top-K distinct of W̃_i ∪ Ω_i
* :mod:`~rest_fast.train.self_train` — R epochs of the captioning loss on one sampled caption per video
* :mod:`~rest_fast.train.generate_round` — a new caption per video, embed the new ones, re-rank, snapshot
* :mod:`~rest_fast.train.loop` — Algorithm 1, resumable (:func:`train`)
* :mod:`~rest_fast.run.rundir`, :mod:`~rest_fast.train.report` — the run directory and its report
* :mod:`~rest_fast.train.demo`, :mod:`~rest_fast.train.distributed`, :mod:`~rest_fast.train.inputs`

``from rest_fast.train import TrainConfig, train`` — ``train`` (and torch) load on first use.
"""

from __future__ import annotations

from rest_fast.run.config import TrainConfig, resolve_config

__all__ = ["TrainConfig", "resolve_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from rest_fast.train.loop import train

        return train
    raise AttributeError(f"module 'rest_fast.train' has no attribute {name!r}")
