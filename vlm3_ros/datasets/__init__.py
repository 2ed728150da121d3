"""Readers for RGB-D datasets with ground-truth poses (used by tests, evaluation and training)."""

from .sevenscenes import DatasetError, SevenScenes

__all__ = ["DatasetError", "SevenScenes"]
