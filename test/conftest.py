"""Shared fixtures: paths to the repository and to the optional shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('DENSE_MATCH_SHARED', REPO_ROOT.parent / 'shared'))
SHARED_DATA = SHARED / 'data'


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """../shared/data, or a clean skip where it is absent (it is never copied in)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'{SHARED_DATA} absent')
    return SHARED_DATA
