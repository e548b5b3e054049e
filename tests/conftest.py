"""Shared fixtures: tiny models and data for real ``Trainer.fit`` runs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Lightning's hints about workers and the absence of accelerators are noise in tiny test fits.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
