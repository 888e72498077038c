"""Component health for ``/healthz``: each loop (selector, workers, outbox, SCP) reports whether its
last pass worked. A component that is failing makes the node "degraded" until it succeeds again.

Reasons recorded here are shown on the open ``/healthz`` endpoint: they name the failing step and
the error class, never a header value or patient data.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ComponentState:
    failing: bool
    reason: str
    since: float
    failures: int


class ComponentHealth:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, ComponentState] = {}

    def ok(self, component: str) -> None:
        with self._lock:
            state = self._states.get(component)
            if state is None or state.failing:
                self._states[component] = ComponentState(False, "ok", time.time(), 0)

    def failing(self, component: str, reason: str) -> None:
        with self._lock:
            state = self._states.get(component)
            since = state.since if state is not None and state.failing else time.time()
            failures = (state.failures if state is not None and state.failing else 0) + 1
            self._states[component] = ComponentState(True, reason, since, failures)

    def state(self, component: str) -> ComponentState | None:
        with self._lock:
            return self._states.get(component)

    def failing_components(self) -> dict[str, str]:
        with self._lock:
            return {name: f"{s.reason} ({s.failures} failures since {time.strftime('%H:%M:%S', time.gmtime(s.since))}"
                          " UTC)" for name, s in self._states.items() if s.failing}
