"""In-process counters and histograms rendered in the Prometheus text format (no extra dependency)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]
HISTOGRAM_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._hist: dict[str, dict[str, float | list[int]]] = {}
        self._gauges: list[Callable[[], list[tuple[str, str, Labels, float]]]] = []

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._counters.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + amount

    def histogram(self, name: str, help_text: str) -> None:
        self._help[name] = ("histogram", help_text)
        self._hist[name] = {"sum": 0.0, "count": 0, "buckets": [0] * len(HISTOGRAM_BUCKETS)}

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            h = self._hist[name]
            h["sum"] = float(h["sum"]) + value  # type: ignore[arg-type]
            h["count"] = int(h["count"]) + 1  # type: ignore[call-overload]
            buckets = h["buckets"]
            assert isinstance(buckets, list)
            for i, bound in enumerate(HISTOGRAM_BUCKETS):
                if value <= bound:
                    buckets[i] += 1

    def gauges(self, provider: Callable[[], list[tuple[str, str, Labels, float]]]) -> None:
        """Register a callable returning (name, help, labels, value) read at scrape time."""
        self._gauges.append(provider)

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, series in self._counters.items():
                kind, help_text = self._help.get(name, ("counter", name))
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                lines += [f"{name}{_fmt_labels(k)} {v:g}" for k, v in sorted(series.items())]
                if not series:
                    lines.append(f"{name} 0")
            for name, h in self._hist.items():
                lines += [f"# HELP {name} {self._help[name][1]}", f"# TYPE {name} histogram"]
                buckets = h["buckets"]
                assert isinstance(buckets, list)
                for bound, count in zip(HISTOGRAM_BUCKETS, buckets):
                    lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
                lines += [f'{name}_bucket{{le="+Inf"}} {h["count"]}', f"{name}_sum {h['sum']:g}",
                          f"{name}_count {h['count']}"]
        seen: set[str] = set()
        for provider in self._gauges:
            for name, help_text, labels, value in provider():
                if name not in seen:
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
                    seen.add(name)
                lines.append(f"{name}{_fmt_labels(labels)} {value:g}")
        return "\n".join(lines) + "\n"


def node_metrics() -> Metrics:
    m = Metrics()
    m.counter("radvlm_instances_received_total", "instances acknowledged by C-STORE, by outcome")
    m.counter("radvlm_instances_refused_total", "C-STORE requests answered with a failure status, by reason")
    m.counter("radvlm_associations_total", "associations, by result (accepted/rejected)")
    m.counter("radvlm_studies_selected_total", "selection decisions, by outcome and rule")
    m.counter("radvlm_instances_skipped_total", "instances not used for inference, by decision")
    m.counter("radvlm_jobs_total", "inference job outcomes")
    m.counter("radvlm_deliveries_total", "delivery attempts, by destination kind and outcome")
    m.counter("radvlm_delivery_retries_total", "deliveries scheduled for another try, by destination")
    m.histogram("radvlm_inference_seconds", "seconds per study spent in the inference core")
    return m
