"""The model behind the chat API: loaded once (lazily), one generation at a time, encoded images
kept in a small LRU so follow-up questions about the same image reuse its KV prefix.

The OpenAI wire format is stateless (each request carries the whole conversation and the
image), so the cache key is the image's pixels: a client that sends the same image again gets
the prefix prefilled on the first turn back, exactly as ``ChatSession`` does in-process.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from inference.batching import BatchScheduler
from inference.errors import ModelError
from inference.image import ModelImage
from inference.model import Generation, ImagePrefix, RadVLMModel, Turn
from inference.result import ModelInfo

log = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """The model could not be loaded (503 for API clients)."""


@dataclass(frozen=True)
class ChatAnswer:
    generation: Generation
    cache_hit: bool  # the image's encoded prefix came from the cache (no image re-encoding)


@dataclass
class StreamedAnswer:
    """An answer being generated in a background thread: iterate ``pieces()`` for text as tokens are
    produced (whitespace at the start and end held back so the pieces join to ``generation.text``),
    then read ``generation`` (the generation's exception is raised there)."""

    cache_hit: bool
    _pieces: Iterator[str]
    _thread: threading.Thread
    _box: dict = field(default_factory=dict)

    def pieces(self) -> Iterator[str]:
        pending, sent, started = "", [], False
        for piece in self._pieces:
            text = pending + piece
            if not started:
                text = text.lstrip()
            body = text.rstrip()
            pending = text[len(body):]
            if body:
                started = True
                sent.append(body)
                yield body
        self._thread.join()
        final = self._box.get("generation")
        if final is not None:
            streamed = "".join(sent)
            if final.text != streamed:
                if final.text.startswith(streamed):
                    yield final.text[len(streamed):]
                else:  # the incremental decode differed from the whole decode: the final chunk tells
                    log.warning("streamed text differs from the decoded answer (%d vs %d characters)",
                                len(streamed), len(final.text))

    @property
    def generation(self) -> Generation:
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["generation"]


def token_streamer(tokenizer):
    """A ``TextIteratorStreamer`` that hands on the text of every token as it is produced (the stock
    one waits for a space), holding back only an incomplete UTF-8 sequence ("\ufffd" at the end)."""
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value) -> None:
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            printable, self.print_len = text[self.print_len:], len(text)
            if text.endswith("\n"):  # as the stock streamer: start decoding afresh after a line
                self.token_cache, self.print_len = [], 0
            if printable:
                self.on_finalized_text(printable)

    return TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


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

    def _prefix(self, model: RadVLMModel, image: ModelImage) -> tuple[ImagePrefix, bool]:
        """The encoded image and whether it came from the cache (call with the model lock held)."""
        key = image_key(image)
        prefix = self._cache.get(key)
        if prefix is not None:
            self._cache.move_to_end(key)
            return prefix, True
        prefix = model.encode_image(image, reuse_prefix=True)
        self._cache[key] = prefix
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return prefix, False

    def answer(self, image: ModelImage, turns: Sequence[Turn], max_new_tokens: int | None = None) -> Generation:
        """Greedy answer to the last user turn; ``max_new_tokens`` is capped at the configured maximum."""
        return self.respond(image, turns, max_new_tokens).generation

    def respond(self, image: ModelImage, turns: Sequence[Turn], max_new_tokens: int | None = None) -> ChatAnswer:
        """``answer`` plus whether the image's prefix was a cache hit."""
        model = self.model
        limit = min(max_new_tokens or model.settings.max_new_tokens, model.settings.max_new_tokens)
        if self._max_batch <= 1:
            with self.lock:
                prefix, hit = self._prefix(model, image)
                return ChatAnswer(model.answer(prefix, list(turns), max_new_tokens=limit), hit)
        with self.lock:
            prefix, hit = self._prefix(model, image)
            question = model.prepare(prefix, list(turns), max_new_tokens=limit)
        return ChatAnswer(self._batcher(model).answer(question), hit)

    def stream(self, image: ModelImage, turns: Sequence[Turn], max_new_tokens: int | None = None) -> StreamedAnswer:
        """Start a greedy answer whose text arrives as tokens are produced. Streaming requests bypass
        the batch scheduler: one generate call with a ``TextIteratorStreamer`` under the model lock
        (so they still take turns with batches and the node's workers). Errors in preparing the
        question (control tokens) raise here, before anything is sent."""
        model = self.model
        limit = min(max_new_tokens or model.settings.max_new_tokens, model.settings.max_new_tokens)
        self.lock.acquire()
        try:
            prefix, hit = self._prefix(model, image)
            question = model.prepare(prefix, list(turns), max_new_tokens=limit)
        except BaseException:
            self.lock.release()
            raise
        streamer = token_streamer(model.tokenizer)
        box: dict = {}

        def generate() -> None:
            try:
                box["generation"] = model.answer_streaming(question, streamer)
            except Exception as exc:  # handed to the reader of StreamedAnswer.generation
                box["error"] = exc
                streamer.end()
            finally:
                self.lock.release()

        thread = threading.Thread(target=generate, name="radvlm-stream", daemon=True)
        thread.start()
        return StreamedAnswer(hit, iter(streamer), thread, box)

    def _batcher(self, model: RadVLMModel) -> BatchScheduler:
        with self._load_lock:
            if self._scheduler is None:
                self._scheduler = BatchScheduler(model, max_batch=self._max_batch,
                                                 max_wait_ms=self._max_batch_wait_ms, lock=self.lock)
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
