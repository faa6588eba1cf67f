"""Moved to :mod:`rest_fast.run.rundir` (shared by the trainer and the evaluator); this name stays an alias."""

import sys

from rest_fast.run import rundir as _moved

sys.modules[__name__] = _moved
