"""llama.cpp engine with continuous batching: one context, N sequence slots, one decode per step for all of them."""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from clowder_common import runtime_settings
from clowder_common.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted, Unavailable
from clowder_runtime.embeddings import Embedder
from clowder_runtime.generation import (
    EngineStats, Finish, FinishReason, GenerationJob, GenerationStream, Piece, Priority, TokenLogprob, ToolMode,
)
from clowder_runtime.handover import Handover
from clowder_runtime.logprobs import token_logprob
from clowder_runtime.model import Model, Sampler
from clowder_runtime.prefix import BLOCK_TOKENS, HashedPrefix
from clowder_runtime.scheduling import Suspended, WaitQueue, preemption_victim
from clowder_runtime.step_abort import StepAbort
from clowder_runtime.step_stats import SECOND_BOUNDS, TOKEN_BOUNDS, StepHistogram
from clowder_runtime.stops import StopMatcher
from clowder_runtime.tools import ToolCallParser, call_grammar, template_messages

# What the engine's thread hands a generation's stream: text, a piece with logprobs, the end, or an error.
Output = str | Piece | Finish | BaseException

log = logging.getLogger(__name__)

# Why these: clowder_common.runtime_settings.
DEFAULT_CONTEXT_SIZE = runtime_settings.DEFAULT_CONTEXT_SIZE
DEFAULT_SLOTS = runtime_settings.DEFAULT_SLOTS
DEFAULT_PREFILL_CHUNK = runtime_settings.DEFAULT_BATCH_SIZE
DEFAULT_IDLE_CACHE_TOKENS = 8192
# Taking another slot's prefix also drops this slot's own cache: only worth it for a real gain.
_MIN_COPY_TOKENS = 16
# How long the idle worker sleeps between looks at the queue when nobody wakes it.
_IDLE_WAIT_S = 1.0
# How long batch work leaves alone the cache an interactive request left (taking another free slot, or waiting
# up to _BATCH_HOLD_S for one): a user's next turn comes within this, typically, and finds its conversation cached.
_KEPT_FOR_INTERACTIVE_S = 30.0
# How long batch work waits at most, while other sequences run, for a slot other than a conversation's.
_BATCH_HOLD_S = 2.0
# llama_decode's result for a decode its abort callback stopped.
_ABORTED = 2


@dataclass(frozen=True)
class LlamaSettings:
    model_path: str
    # Per sequence: a prompt plus its output must fit in this many tokens.
    context_size: int = DEFAULT_CONTEXT_SIZE
    # 0 uses every CPU.
    threads: int = 0
    max_waiting: int = 64
    # Sequences decoded together; the KV cache holds slots * context_size tokens.
    slots: int = DEFAULT_SLOTS
    # Prompt tokens evaluated per step at most, so running streams keep flowing during a long prefill.
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # LoRA adapters: name -> GGUF path.
    adapters: dict[str, str] = field(default_factory=dict)
    # Jinja chat template used instead of the GGUF's; empty: the GGUF's.
    chat_template: str = ""
    # KV entries idle slots keep for prefix reuse, all together; the least recently used go first.
    idle_cache_tokens: int = DEFAULT_IDLE_CACHE_TOKENS
    # Work that finds the engine idle waits for requests sent with it while they keep coming at most burst_gap_s
    # apart, burst_wait_max_s in all: a burst reaches the runtime a request every millisecond or two (each crosses
    # the balancer first; measured 0.2-4 ms), and without the wait its first request decodes alone and the
    # others join a step later. 0: no wait.
    burst_gap_s: float = 0.003
    burst_wait_max_s: float = 0.02


class _Work:
    """One admitted job as the worker thread sees it."""

    def __init__(self, job: GenerationJob, tokens: list[int], max_new: int, grammar: str | None) -> None:
        self.job = job
        self.tokens = tokens
        self.max_new = max_new
        # Forces tool calls (tool_choice required or a named function).
        self.grammar = grammar
        self.cancelled = threading.Event()
        self.stream: GenerationStream | None = None
        # Set while the job waits to resume after a preemption (scheduling.py).
        self.suspended: Suspended | None = None
        # When it last joined the waiting queue.
        self.queued_at = time.monotonic()


class _Slot:
    """One llama.cpp sequence id; its KV entries outlive the request, for the next one to reuse."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        # Tokens whose KV entries this sequence holds, in position order.
        self.cache: list[int] = []
        self.adapter = ""
        self.prefix = HashedPrefix()
        self.last_used = 0.0
        # Until then batch work takes this idle slot only when no other is free: it holds the prefix of an
        # interactive request (a conversation's next turn would find it here).
        self.kept_until = 0.0
        self.work: _Work | None = None
        # Per request:
        self.sampler: Sampler | None = None
        self.n_prompt = 0
        # Tokens the sequence's KV must hold before it decodes: the prompt, or after a preemption the prompt
        # plus what it had generated (recomputed).
        self.prefill: list[int] = []
        # After a preemption: the token sampled before it, fed once `prefill` is back in the cache.
        self.resume_pending: int | None = None
        self.cached = 0
        self.pending: int | None = None  # sampled, not yet in the cache
        self.produced = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(())
        # Only when the job's tool calls are parsed out of the text.
        self.calls: ToolCallParser | None = None
        self.started = 0.0

    @property
    def prefilling(self) -> bool:
        return self.work is not None and len(self.cache) < len(self.prefill)


class LlamaEngine:
    """Owns the llama.cpp context; every call that touches it runs on one worker thread.

    Each step the worker builds one batch: the next token of every decoding
    sequence plus up to `prefill_chunk` prompt tokens of sequences still being
    prefilled, and decodes it with a single llama_decode. Requests take a free
    slot as soon as one exists and leave at the step after they finish or are
    cancelled. LoRA adapters apply to the whole context, so one step decodes
    only sequences that use the same adapter; groups take turns step by step
    (mixing adapters costs throughput, never correctness).

    Tokenizing and template rendering only read the vocabulary, so they run on
    a separate single-thread executor: a request is checked (and a too long
    prompt refused) without waiting for the batch.
    """

    def __init__(self, settings: LlamaSettings) -> None:
        if settings.context_size < 16:
            raise InvalidArgument(f"context size {settings.context_size} is too small", field="context_size")
        if settings.max_waiting < 0:
            raise InvalidArgument("max_waiting must not be negative", field="max_waiting")
        if settings.slots < 1:
            raise InvalidArgument("slots must be at least 1", field="slots")
        if settings.prefill_chunk < 1:
            raise InvalidArgument("prefill_chunk must be at least 1", field="prefill_chunk")
        if settings.idle_cache_tokens < 0:
            raise InvalidArgument("idle_cache_tokens must not be negative", field="idle_cache_tokens")
        for name in ("burst_gap_s", "burst_wait_max_s"):
            # The comparison also refuses NaN, which the worker's condition wait would choke on.
            if not 0 <= getattr(settings, name) <= 1.0:
                raise InvalidArgument(f"{name} must be between 0 and 1 s", field=name)
        self._settings = settings
        self._threads = settings.threads or os.cpu_count() or 1
        # What set_threads asked for; the worker applies it between decode steps (it alone touches the context).
        self._wanted_threads = self._threads
        self._cond = threading.Condition()
        # Interactive work ahead of batch work (scheduling.py).
        self._waiting: WaitQueue[_Work] = WaitQueue()
        self._slots = [_Slot(i) for i in range(settings.slots)]
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model: Model | None = None
        # llama.cpp's context (a ctypes pointer) once the model is loaded.
        self._ctx: Any = None
        self._adapter_turn = itertools.count()
        self._current_adapter: str | None = None
        # Adapters selectable now (name -> GGUF path): the ones loaded at start, then load_adapter/drop_adapter.
        self._adapter_paths: dict[str, str] = dict(settings.adapters)
        # Being unloaded: new requests for these are refused (another replica may hold them).
        self._refusing: set[str] = set()
        # Dropped adapters the context may still have applied: freed once a step switched it away.
        self._retired: list[ctypes.c_void_p] = []
        # llama.cpp keeps a model's adapters in a set that init (off the worker) and free (on it) both change.
        self._lora_lock = threading.Lock()
        self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-tokenize")
        # Embeddings run on their own context and thread: they never wait for, nor hold up, decode steps.
        self._embedder = Embedder(settings.context_size, self._threads)
        self._embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-embed")
        # What the worker produced for streams since its last hand-over to the event loop.
        self._outbox: list[tuple[GenerationStream, Output]] = []
        # To the event loop, set by start().
        self._handover: Handover[list[tuple[GenerationStream, Output]]] | None = None
        self._requests_total = 0
        self._generation_tokens_total = 0
        self._prompt_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._preemptions_total = 0
        # An interactive request that arrives while a step decodes batch work cuts the step short (step_abort.py)
        # instead of waiting it out: the step's work is redone, the request's prompt goes first.
        self._abort = StepAbort()
        # Whether the llama_decode running now (or last) may be cut short that way; under the lock.
        self._abortable = False
        self._aborted_steps_total = 0
        self._step_tokens = StepHistogram(TOKEN_BOUNDS)
        self._step_seconds = StepHistogram(SECOND_BOUNDS)

    @property
    def context_size(self) -> int:
        return self._settings.context_size

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def slots(self) -> int:
        return self._settings.slots

    def set_threads(self, threads: int) -> None:
        """Run decode steps on `threads` llama.cpp threads from the next step on (any thread may call it).

        The runtimes sharing a node's cores call it as their number changes: threads beyond the cores spin
        at llama.cpp's barriers and stall each other. The embedding context keeps its count: it runs only
        while an embedding request does, and is not where a whole node's streams are decoded."""
        if not 1 <= threads <= runtime_settings.MAX_THREADS:
            raise InvalidArgument(f"threads must be between 1 and {runtime_settings.MAX_THREADS}, got {threads}",
                                  field="threads")
        with self._cond:
            self._wanted_threads = threads
            self._cond.notify_all()

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(sorted(n for n in self._adapter_paths if n not in self._refusing))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handover = Handover(loop, _deliver)
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._worker, args=(loop, ready), name="runtime-llama", daemon=True)
        self._thread.start()
        await ready

    async def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            abandoned = list(self._waiting)
            self._waiting.clear()
            running = [s.work for s in self._slots if s.work is not None]
            self._cond.notify_all()
        gone = Unavailable("the runtime is shutting down", retry_after=1.0)
        for work in abandoned:
            # Nobody resumes it now; the worker never touches a waiting job's sampler.
            _drop_suspended(work)
        for work in [*abandoned, *running]:
            work.cancelled.set()
            if work.stream is not None:
                work.stream.push_error(gone)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("llama worker still busy %.0fs after shutdown; leaving it", timeout)
        if self._handover is not None and not (self._thread is not None and self._thread.is_alive()):
            # Only once the worker is gone: it may still be writing to the hand-over's pipe.
            self._handover.close()
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self._embed_pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ------------------------------------------------------------------

    async def generate(self, job: GenerationJob) -> GenerationStream:
        with self._cond:
            self._check_adapter(job.adapter)
            self._check_admission(job.priority)
        loop = asyncio.get_running_loop()
        tokens, max_new, grammar = await loop.run_in_executor(self._prep_pool, self._prepare, job)
        work = _Work(job, tokens, max_new, grammar)
        stream = GenerationStream(loop, on_cancel=lambda: self._cancel(work))
        work.stream = stream
        with self._cond:
            # Checked again: the queue may have filled up (or the adapter begun unloading) while we tokenized.
            self._check_adapter(job.adapter)
            self._check_admission(job.priority)
            self._waiting.append(work)
            self._requests_total += 1
            if job.priority is Priority.INTERACTIVE and self._abortable and self._interactive_can_start():
                self._abort.request()
            self._cond.notify()
        return stream

    async def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        model = self._loaded()
        if self._closing:
            raise Unavailable("the runtime is shutting down", retry_after=1.0)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._embed_pool, self._embedder.embed, model, inputs)
        except RuntimeError as exc:
            if self._closing:  # the pool refuses work once shutdown began
                raise Unavailable("the runtime is shutting down", retry_after=1.0) from None
            log.error("embedding failed: %s", exc)
            raise Internal("embedding failed") from None

    def stats(self) -> EngineStats:
        with self._cond:
            busy = [s for s in self._slots if s.work is not None]
            hashes = {h for s in self._slots for h in s.prefix.hashes}
            return EngineStats(
                running=len(busy),
                waiting=len(self._waiting),
                # Cached prefixes of idle slots are evictable, so only running sequences count as used.
                kv_cache_usage=sum(len(s.cache) for s in busy) / (self.context_size * self.slots),
                requests_total=self._requests_total,
                generation_tokens_total=self._generation_tokens_total,
                prompt_tokens_total=self._prompt_tokens_total,
                slots=self.slots,
                cached_prompt_tokens_total=self._cached_prompt_tokens_total,
                preemptions_total=self._preemptions_total,
                aborted_steps_total=self._aborted_steps_total,
                step_tokens=self._step_tokens.snapshot(),
                step_seconds=self._step_seconds.snapshot(),
                prefix_block_hashes=tuple(sorted(hashes)),
                prefix_block_tokens=BLOCK_TOKENS,
                adapters=self.adapters,
                running_adapters=tuple(sorted({s.work.job.adapter for s in busy if s.work})),
                waiting_adapters=tuple(sorted({w.job.adapter for w in self._waiting})),
                threads=self._threads,
            )

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens a raw completion prompt becomes (BOS added as the model asks)."""
        return self._loaded().tokenize(prompt, add_bos=True)

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Tokens a chat becomes: the model's template with its control tokens, the contents as plain text."""
        return self._loaded().tokenize_chat(messages, tools)

    def _loaded(self) -> Model:
        model = self._model
        if model is None:
            raise Unavailable("the model is not loaded (starting or shutting down)", retry_after=1.0)
        return model

    def _check_adapter(self, adapter: str) -> None:
        """Under the lock: a request's adapter must be loaded and not being unloaded."""
        if not adapter:
            return
        if adapter not in self._adapter_paths:
            known = ", ".join(self.adapters) or "none"
            raise InvalidArgument(f"unknown adapter {adapter[:80]!r}; this runtime has: {known}", field="adapter")
        if adapter in self._refusing:
            raise Unavailable(f"adapter {adapter[:80]!r} is being unloaded from this replica", retry_after=1.0,
                              reason="ADAPTER_UNLOADING", metadata={"adapter": adapter})

    # -- adapters loaded and unloaded while serving (live_adapters.py drives these) ---------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA GGUF beside running streams (on the tokenizer thread) and make it selectable."""
        loop = asyncio.get_running_loop()
        adapter = await loop.run_in_executor(self._prep_pool, self._init_adapter, path)
        with self._cond:
            model = self._loaded()
            if name in self._adapter_paths:
                self._retired.append(adapter)
                raise InvalidArgument(f"adapter {name!r} is already loaded", field="name")
            model.adapters[name] = adapter
            self._adapter_paths[name] = path

    def _init_adapter(self, path: str) -> ctypes.c_void_p:
        model = self._loaded()
        with self._lora_lock:
            adapter = llama_cpp.llama_adapter_lora_init(model.ptr, path.encode("utf-8"))
        if not adapter:
            raise InvalidArgument(f"llama.cpp cannot load {path} as a LoRA adapter of this model", field="path",
                                  reason="ADAPTER_LOAD_FAILED")
        return adapter

    def refuse_adapter(self, name: str) -> None:
        """New requests for `name` are refused from now on (UNAVAILABLE); running and waiting ones go on."""
        with self._cond:
            if name in self._adapter_paths:
                self._refusing.add(name)

    def adapter_in_use(self, name: str) -> bool:
        """Whether a running or waiting request uses the adapter."""
        with self._cond:
            return (any(s.work is not None and s.work.job.adapter == name for s in self._slots)
                    or any(w.job.adapter == name for w in self._waiting))

    def drop_adapter(self, name: str) -> None:
        """Forget an adapter nobody uses (adapter_in_use False after refuse_adapter); its memory is freed
        once the context no longer applies it (the next step that switches adapters)."""
        with self._cond:
            model = self._loaded()
            if self.adapter_in_use(name):
                raise FailedPrecondition(f"adapter {name!r} is still in use", reason="ADAPTER_IN_USE")
            self._adapter_paths.pop(name, None)
            self._refusing.discard(name)
            adapter = model.adapters.pop(name, None)
            if adapter is not None:
                self._retired.append(adapter)
            if self._current_adapter == name:
                # The next step sets adapters again (and then frees the retired ones).
                self._current_adapter = None
            for slot in self._slots:
                if slot.work is None and slot.adapter == name:
                    # KV computed with the dropped weights: never reuse it (a new adapter may take the name).
                    slot.adapter = "\0dropped"

    def _interactive_can_start(self) -> bool:
        """Whether an interactive request would take a slot at once: one is free or held by batch work."""
        return any(s.work is None or _priority(s) is not Priority.INTERACTIVE for s in self._slots)

    def _check_admission(self, priority: Priority) -> None:
        if self._closing:
            raise Unavailable("the runtime is shutting down", retry_after=1.0)
        free = sum(1 for s in self._slots if s.work is None)
        # Only waiting work that goes first counts: batch work (preempted sequences included) never fills the
        # queue for an interactive request.
        ahead = self._waiting.count_at_or_above(priority)
        if ahead >= free + self._settings.max_waiting:
            raise ResourceExhausted(
                f"{ahead} requests are already waiting for this replica",
                reason="QUEUE_FULL",
                retry_after=1.0,
            )

    def _prepare(self, job: GenerationJob) -> tuple[list[int], int, str | None]:
        """Tokens of the request, how many may be generated, and the grammar forcing tool calls
        if any; runs on the tokenizer thread."""
        model = self._loaded()
        grammar = None
        if job.messages is not None:
            field_name = "messages"
            tools = None
            if job.tools:
                mode = job.tool_choice.mode
                if mode is not ToolMode.NONE and (model.template is None or not model.template.uses_tools):
                    raise InvalidArgument(
                        "this model's chat template does not support tools (it never reads `tools`);"
                        " start the runtime with a chat template that does (chat_template_file)",
                        field="tools", reason="TOOLS_UNSUPPORTED",
                    )
                tools = list(job.tools)
                if mode is ToolMode.FUNCTION:
                    chosen = tuple(t for t in job.tools if t["function"]["name"] == job.tool_choice.function)
                    grammar = call_grammar(chosen, several=False)
                elif mode is ToolMode.REQUIRED:
                    grammar = call_grammar(job.tools, several=True)
                if grammar is not None:
                    model.check_grammar(grammar)
            tokens = self.tokenize_chat(template_messages(job.messages), tools)
            if job.assistant_prefix:
                # After the generation prompt, tokenized on its own as the model once generated it: the
                # model continues the partial answer (a stream the balancer moved here mid-way).
                tokens += model.tokenize(job.assistant_prefix, add_bos=False, special=False)
        else:
            field_name = "prompt"
            tokens = model.tokenize(job.prompt or "", add_bos=True)
        if not tokens:
            raise InvalidArgument(f"the {field_name} is empty after tokenization", field=field_name)
        room = self.context_size - len(tokens)
        if room < 1:
            raise InvalidArgument(
                f"the {field_name} is {len(tokens)} tokens long; the context holds {self.context_size}"
                " including at least one generated token",
                field=field_name,
            )
        return tokens, min(job.sampling.max_tokens, room), grammar

    def _cancel(self, work: _Work) -> None:
        work.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(work)
            except ValueError:
                pass  # already in a slot: the worker frees it at the next step
            else:
                # Waiting to resume after a preemption: out of the queue, so the worker will never use it.
                _drop_suspended(work)
            self._cond.notify()

    # -- the worker thread -----------------------------------------------------------

    def _load(self) -> None:
        started = time.monotonic()
        model = Model(self._settings.model_path, self._settings.adapters, self._settings.chat_template)
        trained = llama_cpp.llama_model_n_ctx_train(model.ptr)
        if 0 < trained < self.context_size:
            # llama.cpp would run it, but positions past the training context give garbage text.
            model.close()
            raise InvalidArgument(
                f"context_size {self.context_size} does not fit the model: it was trained for {trained} tokens",
                field="context_size",
            )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context_size * self.slots
        params.n_seq_max = self.slots
        params.n_batch = max(self._settings.prefill_chunk, self.slots, 32)
        params.n_ubatch = params.n_batch
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        # With flash attention a decoded token's numbers (and so the text at temperature 0) do not
        # depend on which other sequences share the step; without it they did (measured: batched
        # and single runs of the same prompts diverged). llama-cpp-python's Llama defaults to off,
        # so baselines compare against Llama(flash_attn=True).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        # One KV stream per slot. In a shared pool (kv_unified) every token attends over the whole
        # used span of the pool, masked: for a model this small that costs as much as its weights, so
        # the prefixes idle slots keep for reuse slowed every step (measured, 1 thread, 2,400 idle
        # cells: one stream 132 -> 145 tok/s and 4 streams 112 -> 132 tok/s with per-slot streams;
        # bench-runtime's single stream went from 0.89x to 1.03x of direct llama-cpp-python).
        params.kv_unified = False
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            model.close()
            raise FailedPrecondition(
                f"llama.cpp cannot create a context of {params.n_ctx} tokens for {self.slots} slots",
                reason="CONTEXT_FAILED",
            )
        self._model, self._ctx = model, ctx
        self._abort.install(ctx)
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._batch_capacity = params.n_batch
        log.info(
            "model loaded path=%s n_ctx=%d slots=%d threads=%d adapters=%s seconds=%.2f",
            self._settings.model_path, self.context_size, self.slots, self._threads,
            ",".join(self.adapters) or "-", time.monotonic() - started,
        )

    def _worker(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        def resolve(error: BaseException | None) -> None:
            if ready.done():
                return
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

        try:
            self._load()
        except Exception as exc:
            log.error("cannot load model %s: %s", self._settings.model_path, exc)
            if not isinstance(exc, FailedPrecondition):
                exc = FailedPrecondition(f"cannot load model {self._settings.model_path}: {exc}")
            loop.call_soon_threadsafe(resolve, exc)
            return
        loop.call_soon_threadsafe(resolve, None)
        try:
            while True:
                with self._cond:
                    while (not self._closing and not self._waiting and not any(s.work for s in self._slots)
                           and self._wanted_threads == self._threads):
                        # Nothing more to decode: what the last steps made goes out before the worker sleeps.
                        self._hand_over()
                        self._cond.wait(_IDLE_WAIT_S)
                    if self._waiting and self._settings.burst_gap_s > 0 and not any(s.work for s in self._slots):
                        self._gather_burst()
                    if self._closing:
                        return
                    # Whatever asked for an abort is admitted now.
                    self._abort.clear()
                    self._admit()
                    wanted = self._wanted_threads
                if wanted != self._threads:
                    self._apply_threads(wanted)
                try:
                    self._step()
                except Exception:
                    # A failed decode leaves the batch in an unknown state: fail its requests, keep serving.
                    log.exception("decode step failed")
                    for slot in self._slots:
                        if slot.work is not None:
                            self._fail(slot, Internal("generation failed"))
                    self._hand_over()
        finally:
            for slot in self._slots:
                if slot.sampler is not None:
                    slot.sampler.close()
            model, self._model = self._model, None
            # Tokenizing reads the model too: let it finish before the model is freed.
            self._prep_pool.shutdown(wait=True, cancel_futures=True)
            # So does embedding, on its own context, which must go before the model.
            self._embed_pool.shutdown(wait=True, cancel_futures=True)
            self._embedder.close()
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            if model is not None:
                model.close()

    def _gather_burst(self) -> None:
        """The engine was idle and work came: wait for the rest of its burst (under the lock; see burst_gap_s).

        Costs a lone request burst_gap_s; saves each request of a burst but the first a whole step (its
        first token comes with the first's, and the burst ends a step sooner).
        """
        deadline = time.monotonic() + self._settings.burst_wait_max_s
        seen = len(self._waiting)
        while not self._closing:
            wait = min(self._settings.burst_gap_s, deadline - time.monotonic())
            if wait <= 0:
                return
            self._cond.wait(wait)
            if len(self._waiting) == seen:
                return
            seen = len(self._waiting)

    def _apply_threads(self, threads: int) -> None:
        # Between steps, on the worker thread: no decode is using the context's thread pool.
        llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
        log.info("llama.cpp threads %d -> %d", self._threads, threads)
        self._threads = threads

    def _admit(self) -> None:
        """Move waiting work into free slots, the more urgent first, reusing the longest cached prefix there is;
        when every slot is held, waiting work preempts a less urgent sequence (under the lock)."""
        while self._waiting:
            free = [s for s in self._slots if s.work is None]
            if not free:
                if not self._preempt_for(self._waiting.head_priority()):
                    return
                continue
            work = self._waiting.popleft()
            if work.cancelled.is_set():
                _drop_suspended(work)
                continue
            if self._held_for_conversations(work, free):
                self._waiting.requeue(work)
                return
            self._place(work, free)

    def _held_for_conversations(self, work: _Work, free: list[_Slot]) -> bool:
        """Whether batch work waits a little rather than take a slot that holds a conversation's cache.

        Only while other sequences run: their steps bring the worker back here, and one of them may end and
        free a slot nobody is expected back to (a batch line typically; a preempted batch line waits for a slot
        the moment the interactive request that took its own ends, and would otherwise take that one)."""
        if work.job.priority is not Priority.BATCH or not any(s.work is not None for s in self._slots):
            return False
        now = time.monotonic()
        if any(s.kept_until <= now for s in free):
            return False
        return now - work.queued_at < _BATCH_HOLD_S

    def _preempt_for(self, priority: Priority | None) -> bool:
        """Free a slot for waiting work of `priority` by preempting a less urgent sequence; False: none is."""
        if priority is None:
            return False
        running = [(s, _priority(s), len(s.prefill) if s.prefilling else len(s.cache))
                   for s in self._slots if s.work is not None]
        victim = preemption_victim(running, priority)
        if victim is None:
            return False
        self._preempt(victim)
        return True

    def _preempt(self, slot: _Slot) -> None:
        """Take the slot from its sequence now; the job waits at the head of its class and resumes by
        recomputing its KV entries (scheduling.Suspended keeps the rest). Under the lock, between steps."""
        work = slot.work
        assert work is not None and slot.sampler is not None
        if work.cancelled.is_set():
            self._release(slot, cancelled=True)
            return
        if slot.prefilling:
            tokens, pending = list(slot.prefill), slot.resume_pending
        else:
            tokens, pending = list(slot.cache), slot.pending
        suspended = work.suspended = Suspended(
            tokens=tokens, pending=pending, sampler=slot.sampler, n_prompt=slot.n_prompt, cached=slot.cached,
            produced=slot.produced, decoder=slot.decoder, stops=slot.stops, calls=slot.calls, started=slot.started,
        )
        # The slot's KV entries stay: the next request may share a prefix with them, and the preempted one
        # finds them again if nobody overwrote them by the time it resumes.
        slot.sampler = None
        slot.pending = None
        slot.resume_pending = None
        slot.calls = None
        slot.last_used = time.monotonic()
        slot.work = None
        work.queued_at = time.monotonic()
        self._waiting.requeue(work)
        self._preemptions_total += 1
        log.info("generation preempted request_id=%r completion_tokens=%d tokens_to_recompute=%d",
                 work.job.request_id[:64], suspended.produced, len(tokens))

    def _place(self, work: _Work, free: list[_Slot]) -> None:
        now = time.monotonic()
        if work.job.priority is Priority.BATCH:
            free = [s for s in free if s.kept_until <= now] or free
        suspended = work.suspended
        prompt, adapter = (work.tokens if suspended is None else suspended.tokens), work.job.adapter
        # At least the last prompt token is evaluated: its logits give the first output token. A resumed
        # sequence whose next token was sampled before its preemption needs no logits: all of it may be cached.
        limit = len(prompt) - 1 if suspended is None or suspended.pending is None else len(prompt)

        def shared(slot: _Slot) -> int:
            if slot.adapter != adapter:
                return 0
            n = 0
            for a, b in zip(slot.cache, prompt[:limit]):
                if a != b:
                    break
                n += 1
            return n

        source = max(self._slots, key=shared)
        best = shared(source)
        if best > 0 and source in free:
            target = source
        else:
            # Keep other prefixes cached as long as possible: a slot no conversation is expected back to first,
            # then the least recently used.
            target = min(free, key=lambda s: (s.kept_until > now, s.last_used))
        own = shared(target)
        if best - own >= _MIN_COPY_TOKENS:
            # Across per-slot streams llama.cpp copies a whole stream (a memcpy of the slot's KV, a few
            # ms); the part past the shared prefix is then dropped.
            llama_cpp.llama_memory_seq_rm(self._memory, target.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, source.seq_id, target.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._memory, target.seq_id, best, -1)
            target.cache = prompt[:best]
            kept = best
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, target.seq_id, own, -1)
            del target.cache[own:]
            kept = own
        if target.adapter != adapter:
            target.prefix.reset(adapter)
        target.prefix.truncate(kept)
        target.prefix.update(target.cache)
        target.adapter = adapter
        target.work = work
        target.prefill = prompt
        if suspended is not None:
            self._resume(target, work, suspended, kept)
            return
        target.resume_pending = None
        target.n_prompt = len(prompt)
        target.cached = kept
        target.pending = None
        target.produced = 0
        target.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        target.stops = StopMatcher(work.job.sampling.stop)
        target.started = time.monotonic()
        target.sampler = self._loaded().sampler(work.job.sampling, work.grammar)
        parse_calls = bool(work.job.tools) and work.job.tool_choice.mode is not ToolMode.NONE
        target.calls = ToolCallParser() if parse_calls else None
        target.sampler.accept_prompt(prompt)
        self._prompt_tokens_total += len(prompt)
        self._cached_prompt_tokens_total += kept

    def _resume(self, slot: _Slot, work: _Work, suspended: Suspended, kept: int) -> None:
        """A preempted sequence back in `slot` (holding `kept` of its tokens): its request state as it was,
        its KV entries recomputed by the prefill steps (usage and counters stay those of its admission)."""
        work.suspended = None
        slot.n_prompt = suspended.n_prompt
        slot.cached = suspended.cached
        slot.produced = suspended.produced
        slot.decoder = suspended.decoder
        slot.stops = suspended.stops
        slot.calls = suspended.calls
        slot.started = suspended.started
        slot.sampler = suspended.sampler
        slot.pending = None
        slot.resume_pending = suspended.pending
        self._resume_if_ready(slot)
        log.info("generation resumed request_id=%r completion_tokens=%d tokens_to_recompute=%d",
                 work.job.request_id[:64], slot.produced, len(suspended.tokens) - kept)

    @staticmethod
    def _resume_if_ready(slot: _Slot) -> None:
        """Once a resumed sequence's KV entries are back, the token sampled before its preemption goes next."""
        if slot.resume_pending is not None and slot.work is not None and not slot.prefilling:
            slot.pending, slot.resume_pending = slot.resume_pending, None

    def _step(self) -> None:
        for slot in self._slots:
            if slot.work is not None and slot.work.cancelled.is_set():
                self._release(slot, cancelled=True)
        active = [s for s in self._slots if s.work is not None]
        if not active:
            return
        # A group with an interactive prompt to evaluate goes first: its first token waits for no other group.
        urgent = {s.adapter for s in active if s.prefilling and _priority(s) is Priority.INTERACTIVE}
        adapters = sorted(urgent or {s.adapter for s in active})
        adapter = adapters[next(self._adapter_turn) % len(adapters)]
        group = [s for s in active if s.adapter == adapter]
        if adapter != self._current_adapter:
            self._set_adapter(adapter)

        # Decoding tokens and prompt chunks go to llama.cpp in separate batches: with both in one
        # batch, a long prompt prefilled beside running sequences came out with different rounding
        # (and different temperature-0 text) than the same prompt evaluated alone. The price is a
        # second llama_decode in the steps that prefill.
        decodes = [(slot, slot.pending, True) for slot in group if slot.pending is not None]
        for slot in group:
            slot.pending = None
        chunk = self._settings.prefill_chunk
        budget = chunk
        prefill: list[tuple[_Slot, int, bool]] = []
        # Interactive prompts take the budget first (sorted is stable: slot order within a class).
        for slot in sorted(group, key=_priority):
            if slot.prefilling and slot.work is not None:
                if prefill and _priority(slot) is not _priority(prefill[0][0]):
                    # One class of prompts a chunk: an interactive prompt's first token does not wait for batch
                    # prompts evaluated beside it (they go next step).
                    break
                tokens = slot.prefill
                start = len(slot.cache)
                # Chunks end at multiples of `chunk` and are never cut short by a neighbour's
                # prefill: how a prompt is split changes llama.cpp's rounding, so a prompt is split
                # the same way whether it runs alone or in a crowd (a full chunk waits a step).
                end = min(len(tokens), (start // chunk + 1) * chunk)
                if end - start > budget:
                    continue
                # The last token's logits give the next token, unless that was sampled before a preemption.
                last = len(tokens) - 1 if slot.resume_pending is None else -1
                prefill.extend((slot, tokens[i], i == last) for i in range(start, end))
                budget -= end - start
        # The prompt chunk goes first: a new request's first token then waits for its own prefill only, not
        # also for a decode step of every running stream (on CPU, 16 running streams make that step several
        # times longer than one stream's). Each sequence has its own KV stream, so the order of the two
        # batches changes no sequence's numbers; the running streams wait the prefill's time either way.
        if prefill:
            if not self._decode(group, prefill, prompts=True):
                _restore_pending(decodes)
                return
            for slot in group:
                self._resume_if_ready(slot)
        if decodes and not self._decode(group, decodes, prompts=False):
            _restore_pending(decodes)

    def _decode(self, group: list[_Slot], entries: list[tuple[_Slot, int, bool]], prompts: bool) -> bool:
        """One llama_decode over (slot, token, wants logits) entries, then sample where logits were asked.

        False: an interactive request arrived and the decode, which held batch work, was cut short and undone
        (step_abort.py); the caller puts back what it took for it."""
        # A chunk of prompts is one class; decoding tokens may mix classes (the interactive ones then lose the
        # part of a step that was computed: at most one step, once per arriving interactive request).
        abortable = (any(_priority(slot) is Priority.BATCH for slot, _, _ in entries)
                     and not (prompts and _priority(entries[0][0]) is Priority.INTERACTIVE))
        with self._cond:
            self._abortable = abortable
            if not abortable:
                self._abort.clear()
            elif self._waiting.head_priority() is Priority.INTERACTIVE and self._interactive_can_start():
                # It came during a decode that could not be cut short (an interactive prompt's): this one goes
                # no further than its first node, and the next step admits it.
                self._abort.request()
        batch = self._batch
        outputs: list[tuple[_Slot, int]] = []
        # Where each sequence's entries start: an aborted decode is undone from there.
        starts: dict[_Slot, int] = {}
        for n, (slot, token, logits) in enumerate(entries):
            starts.setdefault(slot, len(slot.cache))
            batch.token[n] = token
            batch.pos[n] = len(slot.cache)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            if logits:
                outputs.append((slot, n))
            slot.cache.append(token)
        batch.n_tokens = len(entries)
        # What the previous decode made goes to the event loop now, as this thread is about to let go of the
        # GIL for llama_decode: woken earlier, the loop's thread would wait for the GIL (and this thread for it)
        # while this one samples and builds the batch (measured: a quarter of a millisecond a step).
        self._hand_over()
        started = time.perf_counter()
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code == _ABORTED and abortable:
            # llama.cpp dropped the aborted ubatch from the KV cache; with several ubatches the ones before it
            # stayed, and their logits are lost: every sequence of the decode is set back to where it started.
            for slot, start in starts.items():
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, start, -1)
                del slot.cache[start:]
                slot.prefix.truncate(start)
            with self._cond:
                self._aborted_steps_total += 1
            log.debug("decode of %d tokens cut short for an interactive request", len(entries))
            return False
        if code != 0:
            # Undo the bookkeeping: those tokens are not in the cache.
            self._rollback(group)
            raise RuntimeError(f"llama_decode returned {code}")
        self._step_seconds.observe(time.perf_counter() - started)
        self._step_tokens.observe(len(entries))
        for slot in group:
            slot.prefix.update(slot.cache)
        for slot, index in outputs:
            work = slot.work
            if work is None:
                continue
            assert slot.sampler is not None
            token = slot.sampler.sample(self._ctx, index)
            sampling = work.job.sampling
            if sampling.logprobs:
                self._emit(slot, token, token_logprob(self._loaded(), self._ctx, index, token, sampling.top_logprobs))
            else:
                self._emit(slot, token)
        return True

    def _send(self, stream: GenerationStream, item: Output) -> None:
        self._outbox.append((stream, item))

    def _hand_over(self) -> None:
        """Everything produced since the last hand-over, to the event loop in one wake-up (handover.py):
        a step with many streams wakes it once, not once per stream."""
        if self._outbox and self._handover is not None:
            items, self._outbox = self._outbox, []
            self._handover.send(items)

    def _rollback(self, group: list[_Slot]) -> None:
        for slot in group:
            pos = llama_cpp.llama_memory_seq_pos_max(self._memory, slot.seq_id) + 1
            del slot.cache[pos:]
            slot.prefix.truncate(pos)

    def _set_adapter(self, adapter: str) -> None:
        model = self._loaded()
        if adapter:
            # llama_cpp types the array's element as a pointer type the handle (a c_void_p) converts to at run time.
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(model.adapters[adapter])  # type: ignore[misc]
            scales = (ctypes.c_float * 1)(1.0)
            code = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        else:
            code = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        if code != 0:
            raise RuntimeError(f"llama_set_adapters_lora returned {code}")
        self._current_adapter = adapter
        if self._retired:
            # The context applies only `adapter` now: dropped ones can go.
            with self._cond:
                retired, self._retired = self._retired, []
            with self._lora_lock:
                for dropped in retired:
                    llama_cpp.llama_adapter_lora_free(dropped)

    def _emit(self, slot: _Slot, token: int, logprob: TokenLogprob | None = None) -> None:
        work = slot.work
        assert work is not None and work.stream is not None and self._model is not None
        if self._model.is_eog(token):
            self._finish(slot, FinishReason.STOP)
            return
        slot.produced += 1
        with self._cond:
            self._generation_tokens_total += 1
        text, hit = slot.stops.feed(slot.decoder.decode(self._model.piece(token)))
        if slot.calls is not None and text:
            text = slot.calls.feed(text)
        if logprob is not None:
            # Sent even with no text (held for a stop string), so every counted token has its entry.
            self._send(work.stream, Piece(text, (logprob,), slot.produced, slot.n_prompt))
        elif text:
            # With the counts: the balancer continues a broken stream elsewhere with the tokens left.
            self._send(work.stream, Piece(text, (), slot.produced, slot.n_prompt))
        if hit:
            self._finish(slot, FinishReason.STOP)
        elif slot.produced >= work.max_new:
            self._finish(slot, FinishReason.LENGTH)
        else:
            slot.pending = token

    def _finish(self, slot: _Slot, reason: FinishReason) -> None:
        work = slot.work
        assert work is not None and work.stream is not None
        text = ""
        if not slot.stops.stopped:
            text, hit = slot.stops.feed(slot.decoder.decode(b"", final=True))
            if hit:
                reason = FinishReason.STOP
            text += slot.stops.flush()
        calls: tuple = ()
        if slot.calls is not None:
            text = slot.calls.feed(text) + slot.calls.finish()
            calls = tuple(slot.calls.calls)
            if calls:
                reason = FinishReason.TOOL_CALLS
        if text:
            self._send(work.stream, text)
        finish = Finish(reason, slot.n_prompt, slot.produced, slot.cached, calls)
        # The slot is free before the caller hears of the end, so stats read right after agree.
        self._release(slot)
        self._send(work.stream, finish)
        log.info(
            "generation done request_id=%r finish=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d"
            " seconds=%.2f",
            work.job.request_id[:64], reason.value, slot.n_prompt, slot.cached, slot.produced,
            time.monotonic() - slot.started,
        )

    def _fail(self, slot: _Slot, error: BaseException) -> None:
        if slot.work is not None and slot.work.stream is not None:
            self._send(slot.work.stream, error)
        # What the failed step left in this sequence is unknown: drop it.
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cache = []
        slot.prefix.truncate(0)
        self._release(slot)

    def _release(self, slot: _Slot, cancelled: bool = False) -> None:
        work = slot.work
        if cancelled and work is not None:
            log.info("generation cancelled request_id=%r completion_tokens=%d seconds=%.2f",
                     work.job.request_id[:64], slot.produced, time.monotonic() - slot.started)
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None
        slot.pending = None
        slot.calls = None
        slot.last_used = time.monotonic()
        if work is not None and work.job.priority is Priority.INTERACTIVE:
            slot.kept_until = slot.last_used + _KEPT_FOR_INTERACTIVE_S
        with self._cond:
            slot.work = None
        self._trim_idle_caches()

    def _trim_idle_caches(self) -> None:
        """Keep the most recently used idle caches within idle_cache_tokens; drop the others."""
        budget = self._settings.idle_cache_tokens
        idle = sorted((s for s in self._slots if s.work is None and s.cache), key=lambda s: s.last_used, reverse=True)
        for slot in idle:
            if len(slot.cache) <= budget:
                budget -= len(slot.cache)
                continue
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.cache = []
            slot.prefix.truncate(0)


def _priority(slot: _Slot) -> Priority:
    return slot.work.job.priority if slot.work is not None else Priority.BATCH


def _restore_pending(decodes: list[tuple[_Slot, int, bool]]) -> None:
    """Tokens a step took to decode go back to their sequences, for the next step (that one was cut short)."""
    for slot, token, _ in decodes:
        if slot.work is not None:
            slot.pending = token


def _drop_suspended(work: _Work) -> None:
    """Free what a preempted job kept for resuming; only whoever took it out of the queue may call it."""
    suspended, work.suspended = work.suspended, None
    if suspended is not None:
        suspended.sampler.close()


def _deliver(items: list[tuple[GenerationStream, Output]]) -> None:
    """On the event loop: a step's outputs into their streams, in the order they were made."""
    for stream, item in items:
        stream.deliver(item)
