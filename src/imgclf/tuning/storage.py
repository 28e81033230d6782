"""Where a study lives: its Optuna RDB storage (SQLite in the study folder, or a URL shared by several processes
or machines, with heartbeats), and what every process reads from it: the trials that count towards the study's
total, the finished ones, and a sampler seed that keeps processes apart."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from imgclf.errors import ConfigError, ImgclfError

__all__ = [
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "counted_trials",
    "finished_count",
    "open_storage",
    "safe_url",
    "sampler_seed",
]

HEARTBEAT_SECONDS = 60  # a trial whose process stops beating for GRACE_SECONDS is marked failed by the others
GRACE_SECONDS = 180


def open_storage(optuna: Any, url: str) -> Any:
    """The study's RDB storage, with heartbeats (a trial whose process died is marked failed, and its place in the
    count freed); a missing driver or an unreachable database is said with the URL (password hidden).

    Raises:
        ConfigError: the database driver is not installed.
        ImgclfError: the storage cannot be opened (wrong URL, unreachable server, no permission).
    """
    import random
    import warnings

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        except ImportError as exc:
            raise ConfigError(
                f"--storage {safe_url(url)}: the database driver is not installed ({exc}); for PostgreSQL: pip "
                "install 'psycopg[binary]', for MySQL: pip install pymysql"
            ) from None
        except Exception as exc:  # SQLAlchemy's errors: wrong URL, unreachable server, no permission, and ...
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            if attempt == 2 or "IntegrityError" not in type(exc).__name__:
                raise ImgclfError(
                    f"cannot open the study storage {safe_url(url)}: {str(exc).splitlines()[0]}"
                ) from None
            # ... two processes creating the tables of a new database at the same moment: the other one won, so
            # the tables exist when this one tries again
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def counted_trials(study: Any) -> list[Any]:
    """Trials that count towards the study's total: finished (completed, pruned) or running, surplus ones aside."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("surplus")]


def finished_count(study: Any) -> int:
    """How many of the study's trials finished (completed or pruned), in every process."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def sampler_seed(seed: int, existing: int, shared: bool) -> int:
    """The sampler's seed: `seed` moved on by the trials already in the study (a resumed study does not draw its
    first values again), and on a shared storage mixed with this process, so that processes draw apart."""
    mix = f"{seed}:{existing}:{socket.gethostname()}:{os.getpid()}" if shared else f"{seed}:{existing}"
    return int.from_bytes(hashlib.sha256(mix.encode()).digest()[:4], "big")


def safe_url(url: str) -> str:
    """The storage URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
