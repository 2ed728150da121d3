"""pytest configuration of the training package's tests.

Reuses the fixtures of the main test suite (``test/``): ``tiny_checkpoint``, ``tiny_backend``
(model_helpers.py) and ``sevenscenes`` (data_helpers.py, skips where the real frames are absent).
The training package is importable from its source tree even before it is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

TRAINING_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TRAINING_DIR.parent
for path in (REPO_ROOT / "test", TRAINING_DIR, REPO_ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from data_helpers import sevenscenes  # noqa: F401,E402  (fixture registered by import)
from model_helpers import tiny_backend, tiny_checkpoint  # noqa: F401,E402  (fixtures registered by import)
