"""Moved to :mod:`rest_fast.run.config` (shared by the trainer and the evaluator); this name stays an alias."""

import sys

from rest_fast.run import config as _moved

sys.modules[__name__] = _moved
