"""llama.cpp engine: one model, one generation at a time on a dedicated thread, a bounded FIFO queue before it."""

from __future__ import annotations

import asyncio
import codecs
import collections
import ctypes
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jinja2
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from clowder_common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from clowder_runtime.generation import (
    EngineStats,
    Finish,
    FinishReason,
    GenerationJob,
    GenerationStream,
    SamplingSettings,
)
from clowder_runtime.stops import StopMatcher

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_SIZE = 2048
# llama.cpp's default; the request contract has no min_p, so it is fixed for every request.
MIN_P = 0.05
# llama.cpp treats this seed value as "pick one at random".
_RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED


@dataclass(frozen=True)
class LlamaSettings:
    model_path: str
    context_size: int = DEFAULT_CONTEXT_SIZE
    # 0 uses every CPU.
    threads: int = 0
    max_waiting: int = 64


def llama_seed(seed: int | None) -> int:
    """Map any int64 onto llama.cpp's uint32 seeds, avoiding the value that means "random"."""
    if seed is None:
        return random.SystemRandom().randrange(_RANDOM_SEED)
    return seed % _RANDOM_SEED


class _Work:
    """One admitted job as the worker thread sees it."""

    def __init__(self, job: GenerationJob, tokens: list[int], max_new: int) -> None:
        self.job = job
        self.tokens = tokens
        self.max_new = max_new
        self.cancelled = threading.Event()
        self.context_used = 0
        self.stream: GenerationStream | None = None


class LlamaEngine:
    """Owns the `llama_cpp.Llama`; every call into it that touches the context runs on one thread.

    Tokenizing and template rendering only read the vocabulary, so they run on
    a separate single-thread executor: a waiting request is checked (and a too
    long prompt refused) without waiting for the running generation.
    """

    def __init__(self, settings: LlamaSettings) -> None:
        if settings.context_size < 16:
            raise InvalidArgument(f"context size {settings.context_size} is too small", field="context_size")
        if settings.max_waiting < 0:
            raise InvalidArgument("max_waiting must not be negative", field="max_waiting")
        self._settings = settings
        self._threads = settings.threads or os.cpu_count() or 1
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Work] = collections.deque()
        self._running: _Work | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._llm: llama_cpp.Llama | None = None
        self._vocab = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-tokenize")
        self._requests_total = 0
        self._generation_tokens_total = 0
        self._prompt_tokens_total = 0

    @property
    def context_size(self) -> int:
        return self._settings.context_size

    @property
    def threads(self) -> int:
        return self._threads

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._worker, args=(loop, ready), name="runtime-llama", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            abandoned = list(self._waiting)
            self._waiting.clear()
            running = self._running
            self._cond.notify_all()
        gone = Unavailable("the runtime is shutting down", retry_after=1.0)
        for work in [*abandoned, *([running] if running else [])]:
            work.cancelled.set()
            if work.stream is not None:
                work.stream.push_error(gone)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("llama worker still busy %.0fs after shutdown; leaving it", timeout)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ------------------------------------------------------------------

    async def generate(self, job: GenerationJob) -> GenerationStream:
        with self._cond:
            self._check_admission()
        loop = asyncio.get_running_loop()
        tokens, max_new = await loop.run_in_executor(self._prep_pool, self._prepare, job)
        work = _Work(job, tokens, max_new)
        stream = GenerationStream(loop, on_cancel=lambda: self._cancel(work))
        work.stream = stream
        with self._cond:
            # Checked again: the queue may have filled up while we tokenized.
            self._check_admission()
            self._waiting.append(work)
            self._requests_total += 1
            self._cond.notify()
        return stream

    def stats(self) -> EngineStats:
        with self._cond:
            running = self._running
            return EngineStats(
                running=1 if running is not None else 0,
                waiting=len(self._waiting),
                kv_cache_usage=(running.context_used / self.context_size) if running is not None else 0.0,
                requests_total=self._requests_total,
                generation_tokens_total=self._generation_tokens_total,
                prompt_tokens_total=self._prompt_tokens_total,
            )

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens a raw completion prompt becomes (BOS added as the model asks)."""
        return self._model().tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def _model(self) -> llama_cpp.Llama:
        llm = self._llm
        if llm is None:
            raise Unavailable("the model is not loaded (starting or shutting down)", retry_after=1.0)
        return llm

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template applied to `messages`, ending with the assistant's turn."""
        if self._formatter is None:
            raise FailedPrecondition(
                "this model has no chat template (tokenizer.chat_template); send a raw prompt instead",
                reason="NO_CHAT_TEMPLATE",
            )
        try:
            return self._formatter(messages=messages).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            # Templates reject some conversations on purpose (raise_exception), e.g. bad role order.
            raise InvalidArgument(f"the model's chat template rejected the messages: {exc}", field="messages") from None

    def _check_admission(self) -> None:
        if self._closing:
            raise Unavailable("the runtime is shutting down", retry_after=1.0)
        # Requests that will be ahead of this one; it waits unless that is nobody.
        ahead = len(self._waiting) + (0 if self._running is None else 1)
        if ahead > self._settings.max_waiting:
            raise ResourceExhausted(
                f"{len(self._waiting)} requests are already waiting for this replica",
                reason="QUEUE_FULL",
                retry_after=1.0,
            )

    def _prepare(self, job: GenerationJob) -> tuple[list[int], int]:
        """Tokens of the request and how many may be generated; runs on the tokenizer thread."""
        llm = self._model()
        if job.messages is not None:
            field = "messages"
            text = self.render_chat([{"role": t.role, "content": t.content} for t in job.messages])
            # The template already wrote BOS and other special tokens as text.
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        else:
            field = "prompt"
            tokens = self.tokenize_prompt(job.prompt or "")
        if not tokens:
            raise InvalidArgument(f"the {field} is empty after tokenization", field=field)
        room = self.context_size - len(tokens)
        if room < 1:
            raise InvalidArgument(
                f"the {field} is {len(tokens)} tokens long; the context holds {self.context_size}"
                " including at least one generated token",
                field=field,
            )
        return tokens, min(job.sampling.max_tokens, room)

    def _cancel(self, work: _Work) -> None:
        work.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(work)
            except ValueError:
                pass  # already running or done: the worker sees the flag at the next token

    # -- the worker thread -----------------------------------------------------------

    def _load(self) -> llama_cpp.Llama:
        started = time.monotonic()
        llm = llama_cpp.Llama(
            model_path=self._settings.model_path,
            n_ctx=self.context_size,
            n_threads=self._threads,
            n_threads_batch=self._threads,
            verbose=False,
        )
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(llm.token_eos()),
                bos_token=self._token_text(llm.token_bos()),
                add_generation_prompt=True,
            )
        else:
            log.warning("model has no chat template; chat requests will be refused")
        log.info(
            "model loaded path=%s n_ctx=%d threads=%d seconds=%.2f",
            self._settings.model_path, self.context_size, self._threads, time.monotonic() - started,
        )
        return llm

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def _worker(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        def resolve(error: BaseException | None) -> None:
            if ready.done():
                return
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

        try:
            llm = self._load()
        except Exception as exc:
            log.error("cannot load model %s: %s", self._settings.model_path, exc)
            loop.call_soon_threadsafe(
                resolve, FailedPrecondition(f"cannot load model {self._settings.model_path}: {exc}")
            )
            return
        self._llm = llm
        loop.call_soon_threadsafe(resolve, None)
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        return
                    work = self._waiting.popleft()
                    self._running = work
                try:
                    self._run(llm, work)
                except Exception as exc:
                    log.exception("generation failed request_id=%r", work.job.request_id[:64])
                    assert work.stream is not None
                    work.stream.push_error(exc)
                finally:
                    with self._cond:
                        self._running = None
        finally:
            # Tokenizing reads the model too: let it finish before the model is freed.
            self._llm = None
            self._prep_pool.shutdown(wait=True, cancel_futures=True)
            llm.close()

    def _piece(self, token: int) -> bytes:
        size = 64
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
        if n < 0:  # a longer piece: llama.cpp tells how much room it needs
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
        return buf.raw[: max(n, 0)]

    def _run(self, llm: llama_cpp.Llama, work: _Work) -> None:
        stream = work.stream
        assert stream is not None
        if work.cancelled.is_set():
            return
        job, sampling = work.job, work.job.sampling
        n_prompt = len(work.tokens)
        with self._cond:
            self._prompt_tokens_total += n_prompt
        work.context_used = n_prompt
        started = time.monotonic()
        reason = FinishReason.LENGTH
        produced = 0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(sampling.stop)
        # No prefix reuse yet: each request is evaluated from an empty context,
        # so its output depends on the request alone (and a seed reproduces it).
        llm.reset()
        llm.set_seed(llama_seed(sampling.seed))
        tokens = llm.generate(work.tokens, reset=True, **_sampler_args(sampling))
        try:
            for token in tokens:
                if work.cancelled.is_set():
                    break
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = FinishReason.STOP
                    break
                produced += 1
                work.context_used = n_prompt + produced
                with self._cond:
                    self._generation_tokens_total += 1
                text, hit = stops.feed(decoder.decode(self._piece(token)))
                if text:
                    stream.push_text(text)
                if hit:
                    reason = FinishReason.STOP
                    break
                if produced >= work.max_new:
                    break
        finally:
            tokens.close()
        elapsed = time.monotonic() - started
        if work.cancelled.is_set():
            log.info("generation cancelled request_id=%r completion_tokens=%d seconds=%.2f",
                     job.request_id[:64], produced, elapsed)
            return
        if not stops.stopped:
            text, hit = stops.feed(decoder.decode(b"", final=True))
            if hit:
                reason = FinishReason.STOP
            text += stops.flush()
            if text:
                stream.push_text(text)
        stream.push_finish(Finish(reason, n_prompt, produced))
        log.info(
            "generation done request_id=%r finish=%s prompt_tokens=%d completion_tokens=%d seconds=%.2f",
            job.request_id[:64], reason.value, n_prompt, produced, elapsed,
        )


def _sampler_args(sampling: SamplingSettings) -> dict[str, float | int]:
    """Arguments for `Llama.generate`, the same chain `create_completion` builds (temperature 0 is greedy)."""
    return {
        "temp": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": MIN_P,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
    }
