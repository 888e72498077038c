"""The model behind the chat API: loaded once (lazily), one generation at a time, encoded images
kept in a small LRU so follow-up questions about the same image reuse its KV prefix.

The OpenAI wire format is stateless (each request carries the whole conversation and the
image), so the cache key is the image's pixels: a client that sends the same image again gets
the prefix prefilled on the first turn back, exactly as ``ChatSession`` does in-process.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from inference.batching import BatchScheduler
from inference.errors import ModelError
from inference.image import ModelImage
from inference.model import Generation, ImagePrefix, RadVLMModel, Turn
from inference.result import ModelInfo


class ModelUnavailableError(RuntimeError):
    """The model could not be loaded (503 for API clients)."""


def image_key(image: ModelImage) -> str:
    digest = hashlib.sha256(image.pixels.tobytes())
    digest.update(f"{image.rows}x{image.columns}".encode())
    return digest.hexdigest()


class ChatService:
    def __init__(self, model_provider: Callable[[], RadVLMModel], *, lock: threading.Lock | None = None,
                 cache_size: int = 4, max_batch: int = 1, max_batch_wait_ms: float = 10.0) -> None:
        self._provider = model_provider
        self._model: RadVLMModel | None = None
        self._load_lock = threading.Lock()
        self.lock = lock or threading.Lock()  # shared with the node's inference workers
        self._cache: OrderedDict[str, ImagePrefix] = OrderedDict()
        self._cache_size = cache_size
        self._max_batch, self._max_batch_wait_ms = max_batch, max_batch_wait_ms
        self._scheduler: BatchScheduler | None = None  # max_batch > 1: concurrent requests share a generate call

    @classmethod
    def for_model(cls, model: RadVLMModel, **kwargs) -> "ChatService":
        return cls(lambda: model, **kwargs)

    @property
    def model(self) -> RadVLMModel:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    try:
                        self._model = self._provider()
                    except ModelError as exc:
                        raise ModelUnavailableError(f"model unavailable: {exc}") from exc
        return self._model

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def max_new_tokens(self) -> int:
        return self.model.settings.max_new_tokens

    def _prefix(self, model: RadVLMModel, image: ModelImage) -> ImagePrefix:
        key = image_key(image)
        prefix = self._cache.get(key)
        if prefix is None:
            prefix = model.encode_image(image, reuse_prefix=True)
            self._cache[key] = prefix
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return prefix

    def answer(self, image: ModelImage, turns: Sequence[Turn], max_new_tokens: int | None = None) -> Generation:
        """Greedy answer to the last user turn; ``max_new_tokens`` is capped at the configured maximum."""
        model = self.model
        limit = min(max_new_tokens or model.settings.max_new_tokens, model.settings.max_new_tokens)
        if self._max_batch <= 1:
            with self.lock:
                return model.answer(self._prefix(model, image), list(turns), max_new_tokens=limit)
        with self.lock:
            question = model.prepare(self._prefix(model, image), list(turns), max_new_tokens=limit)
        return self._batcher(model).answer(question)

    def _batcher(self, model: RadVLMModel) -> BatchScheduler:
        with self._load_lock:
            if self._scheduler is None:
                self._scheduler = BatchScheduler(model, max_batch=self._max_batch,
                                                 max_wait_ms=self._max_batch_wait_ms, lock=self.lock)
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
