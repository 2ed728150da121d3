"""Locating the shared real data used by some tests.

``../shared/data`` beside the repository (or ``$VLM3_SHARED_DATA``) holds real RGB-D frames with
ground truth on development and CI machines. It is not part of the project: tests that use it
skip, with the reason, where it is absent.

Fixture ``sevenscenes``: a :class:`vlm3_ros.datasets.sevenscenes.SevenScenes` on the redkitchen
frames 150-199 (session scope).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("VLM3_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


SEVENSCENES_DIR = shared_data_dir() / "7scenes_redkitchen"


@pytest.fixture(scope="session")
def sevenscenes():
    if not SEVENSCENES_DIR.is_dir():
        pytest.skip(f"real 7-Scenes frames not present at {SEVENSCENES_DIR}")
    from vlm3_ros.datasets.sevenscenes import SevenScenes

    return SevenScenes(SEVENSCENES_DIR)
