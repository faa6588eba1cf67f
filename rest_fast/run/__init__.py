"""The run layer, shared by :mod:`rest_fast.train` and :mod:`rest_fast.eval` (so neither imports the other).

* :mod:`~rest_fast.run.config` — :class:`TrainConfig`, the single source of truth (YAML, ``key=value``, ``--help``)
* :mod:`~rest_fast.run.rundir` — the run directory: atomic files, checkpoints, state, metrics
* :mod:`~rest_fast.run.optim` — seeds, AdamW and the cosine schedule (Table 10)
"""
