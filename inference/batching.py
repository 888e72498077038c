"""Dynamic batching of concurrent questions into one ``generate`` call.

transformers 5's continuous batching (``generate_batch`` / ``ContinuousBatchingManager``) takes
token ids only: it has no ``pixel_values`` or multimodal embedding path, so it cannot serve
LlavaOnevision (checked on 5.24). This is the small scheduler instead: a request thread tokenises
its question (``RadVLMModel.prepare``, errors stay with that request) and submits it; one
scheduler thread waits for the first question, collects more until ``max_batch`` are waiting or
``max_wait_ms`` has passed since the first, and answers them with ``RadVLMModel.answer_batch``
under the model lock (shared with the node's inference workers). Answers equal the answers alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from inference.model import Generation, PreparedQuestion, RadVLMModel

log = logging.getLogger(__name__)


class SchedulerClosedError(RuntimeError):
    """A question was submitted to (or still waiting in) a scheduler that has been closed."""


@dataclass
class _Pending:
    question: PreparedQuestion
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    questions: int = 0
    largest: int = 0

    @property
    def mean_batch(self) -> float:
        return self.questions / self.batches if self.batches else 0.0


class BatchScheduler:
    """Answers submitted questions in batches of up to ``max_batch`` (one thread, started lazily)."""

    def __init__(self, model: RadVLMModel, *, max_batch: int, max_wait_ms: float,
                 lock: threading.Lock | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.lock = lock or threading.Lock()
        self.stats = BatchStats()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def submit(self, question: PreparedQuestion) -> Future:
        if self._closed:
            raise SchedulerClosedError("the batch scheduler is closed")
        self._ensure_thread()
        pending = _Pending(question)
        self._queue.put(pending)
        return pending.future

    def answer(self, question: PreparedQuestion, timeout: float | None = None) -> Generation:
        """Submit and wait for the answer (the generation's exception is raised here)."""
        return self.submit(question).result(timeout)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(30)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="radvlm-batcher", daemon=True)
                self._thread.start()

    def _collect(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                break
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                with self.lock:
                    answers = self.model.answer_batch([p.question for p in live])
            except Exception as exc:  # any generation failure belongs to every question of the batch
                log.warning("batched generation of %d questions failed: %s", len(live), exc)
                for pending in live:
                    pending.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.questions += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            for pending, generation in zip(live, answers):
                pending.future.set_result(generation)
        while True:  # closed: fail what is still waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(SchedulerClosedError("the batch scheduler was closed"))
