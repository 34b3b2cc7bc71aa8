"""Where the repository, the shared data and the message definitions are.

The package runs from a source tree, from a pip install in a venv and from a colcon
install, so ``Path(__file__).parents[k]`` means something different in each. These helpers
try, in order: an environment variable, the source tree this module sits in, the current
working directory, and the install's share/ folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = 'dense_match_ros'
_HERE = Path(__file__).resolve().parent


def _is_repo(path: Path) -> bool:
    return (path / 'package.xml').is_file() and (path / PACKAGE).is_dir()


def repo_root() -> Path | None:
    """The source checkout (holds package.xml), or None for an installed package."""
    env = os.environ.get('DENSE_MATCH_ROOT')
    for candidate in ([Path(env)] if env else []) + [_HERE.parent, Path.cwd()]:
        if _is_repo(candidate):
            return candidate.resolve()
    return None


def shared_root() -> Path:
    """The ``shared/`` folder beside the checkout ($DENSE_MATCH_SHARED overrides)."""
    env = os.environ.get('DENSE_MATCH_SHARED')
    if env:
        return Path(env)
    root = repo_root()
    return (root if root is not None else Path.cwd()).parent / 'shared'


def data_root() -> Path:
    """Real evaluation data: $DENSE_MATCH_DATA, else ``shared/data``."""
    env = os.environ.get('DENSE_MATCH_DATA')
    return Path(env) if env else shared_root() / 'data'


def share_dir() -> Path:
    """Folder holding launch/, config/ and msg/: the checkout or ``<prefix>/share/<pkg>``."""
    root = repo_root()
    if root is not None:
        return root
    for prefix in [sys.prefix] + os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        candidate = Path(prefix) / 'share' / PACKAGE
        if prefix and candidate.is_dir():
            return candidate
    raise FileNotFoundError(f'cannot find the {PACKAGE} share folder; set DENSE_MATCH_ROOT')
