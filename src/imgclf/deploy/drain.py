"""The server's graceful stop: on SIGTERM readiness turns 503 and new inference requests are refused with 503 and
Retry-After (a load balancer sends them elsewhere), the requests already accepted finish (bounded by a drain
timeout), and only then does uvicorn stop listening and the process exit 0. A second SIGTERM, or SIGINT, stops
at once as uvicorn does.

The drain hooks in where uvicorn's own signal handler is (the app's lifespan runs inside it), so it works the
same with one process or several (`--workers`: the supervisor passes SIGTERM to each worker).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Drain"]

log = logging.getLogger(__name__)


class Drain:
    """Whether the server is stopping, and the SIGTERM handler that starts it."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = threading.Event()
        self.active = 0  # inference requests accepted and not yet answered
        self._lock = threading.Lock()

    @contextmanager
    def admit(self) -> Iterator[bool]:
        """`with drain.admit() as accepted:` True while the server takes requests (the request then counts until
        the block ends), False once it drains (answer 503)."""
        with self._lock:
            accepted = not self.draining.is_set()
            self.active += accepted
        try:
            yield accepted
        finally:
            with self._lock:
                self.active -= accepted

    def install(self) -> None:
        """Put the drain in front of the SIGTERM handler in place (uvicorn's, which stops the server); outside the
        main thread (a server in a test's thread) signals are not ours to take, and nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return  # no server listens for SIGTERM: the default (terminate) stays

        def on_sigterm(sig: int, frame: Any) -> None:
            if self.draining.is_set():
                previous(sig, frame)  # a second SIGTERM: stop now
                return
            self.draining.set()
            log.info("SIGTERM: draining (%d requests in flight, at most %.0f s)", self.active, self.timeout_s)
            threading.Thread(target=self._stop_when_done, args=(previous, sig), daemon=True).start()

        signal.signal(signal.SIGTERM, on_sigterm)

    def _stop_when_done(self, stop: Callable[[int, Any], None], sig: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.active > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.active > 0:
            log.warning("drain timeout: %d requests still in flight are cut off", self.active)
        stop(sig, None)
