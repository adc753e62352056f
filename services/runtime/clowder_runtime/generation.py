"""What the servicer and any engine agree on: jobs, outputs, load figures, and the output stream."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import dataclass
from typing import Callable, Protocol

from clowder_runtime.step_stats import HistogramSnapshot


class FinishReason(enum.Enum):
    # End-of-generation token or a stop string.
    STOP = "stop"
    # max_tokens or the context limit.
    LENGTH = "length"
    # The output held tool calls (Finish.tool_calls).
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    # A JSON object, serialized.
    arguments: str


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    # An assistant turn's calls; a "tool" turn's answer names its call and function.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


class ToolMode(enum.Enum):
    # The model chooses between text and calls; calls are parsed out of the text.
    AUTO = "auto"
    # Tools are shown to the template; the output is text, never parsed.
    NONE = "none"
    # A grammar forces one or more calls to any tool.
    REQUIRED = "required"
    # A grammar forces one call to `ToolChoice.function`.
    FUNCTION = "function"


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolMode = ToolMode.AUTO
    function: str = ""


@dataclass(frozen=True)
class SamplingSettings:
    """Fully resolved sampling values: request, then image defaults, then llama.cpp defaults."""

    temperature: float = 0.8
    top_p: float = 0.95
    # 0 disables top-k (llama.cpp semantics).
    top_k: int = 40
    # Before capping to the room left in the context.
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    # None: a fresh random seed per request.
    seed: int | None = None
    min_p: float = 0.05
    # 1.0 / 0.0 / 0.0 switch the penalties off.
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Constrain the output to JSON with a grammar.
    json: bool = False
    # Log probabilities of each generated token and of the `top_logprobs` likeliest ones.
    logprobs: bool = False
    top_logprobs: int = 0


class Priority(enum.IntEnum):
    """A request's traffic class; lower values go first (GenerateRequest.priority)."""

    INTERACTIVE = 0
    # Batch jobs: admitted after interactive requests, preempted when an interactive one needs the slot.
    BATCH = 1


@dataclass(frozen=True)
class GenerationJob:
    """A validated request; exactly one of `messages` and `prompt` is set."""

    request_id: str
    sampling: SamplingSettings
    messages: tuple[ChatTurn, ...] | None = None
    prompt: str | None = None
    # A LoRA adapter the engine loaded; "" for the base model.
    adapter: str = ""
    # OpenAI tool definitions (plain JSON values) for the chat template; chat only.
    tools: tuple[dict, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    # Chat only: text the answer already begins with (continued, not answered; not repeated in the output).
    assistant_prefix: str = ""
    priority: Priority = Priority.INTERACTIVE

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens taken from the KV cache rather than evaluated.
    cached_prompt_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    data: bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    data: bytes
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Piece:
    """Text with the logprobs of the tokens generated since the last push (when logprobs are asked), and the
    token counts so far (what the balancer needs to continue a broken stream elsewhere)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    # Tokens generated so far, this piece's included; 0 when the engine does not count.
    tokens: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Output:
    """Text produced since the previous Output; `finish` is set on the last one only."""

    text: str
    finish: Finish | None = None
    # Only when the job asked for logprobs: one per token generated since the previous Output.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Tokens generated so far (cumulative) and the prompt's tokens; 0 when the engine did not say.
    completion_tokens: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    # Fraction (0..1) of the context the running generations occupy.
    kv_cache_usage: float
    requests_total: int
    generation_tokens_total: int
    prompt_tokens_total: int
    slots: int = 1
    cached_prompt_tokens_total: int = 0
    # Block hashes of the prefixes held in the KV cache (see prefix.py).
    prefix_block_hashes: tuple[int, ...] = ()
    prefix_block_tokens: int = 0
    adapters: tuple[str, ...] = ()
    # Adapters of the running and of the waiting requests ("" is the base model).
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    # llama.cpp threads decode steps run on now (a runtime sharing its node's cores follows their number).
    threads: int = 0
    # Batch sequences that gave their slot to an interactive request (scheduling.py), since start.
    preemptions_total: int = 0
    # Decode steps of batch work cut short for an arriving interactive request (step_abort.py), since start.
    aborted_steps_total: int = 0
    # Tokens per decode step and its duration, since start (step_stats.py); None where an engine keeps none.
    step_tokens: HistogramSnapshot | None = None
    step_seconds: HistogramSnapshot | None = None


class Engine(Protocol):
    """A loaded model that turns jobs into output streams; the servicer knows nothing more."""

    @property
    def context_size(self) -> int: ...

    async def start(self) -> None:
        """Load the model; returns when it can generate."""

    async def generate(self, job: GenerationJob) -> GenerationStream:
        """Admit a job. Raises InvalidArgument (prompt too long, bad template input),
        ResourceExhausted (queue full) or Unavailable (shutting down)."""

    def stats(self) -> EngineStats: ...

    async def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """L2-normalized mean-pooled vectors, in order, and the number of tokens they took.
        Raises InvalidArgument for an input that does not fit the context."""

    async def close(self, timeout: float) -> None:
        """Stop generating (running work is cancelled) and free the model."""


class GenerationStream:
    """The asyncio end of one generation.

    The engine's thread calls the push_* methods; the RPC handler iterates.
    Pieces that piled up while the handler was busy writing are merged into
    one Output, so a slow reader gets fewer, larger messages instead of lag.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | Piece | Finish | BaseException] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._pending: str | Piece | Finish | BaseException | None = None
        self._finished = False
        self._cancelled = False
        # The latest counts pieces brought (see Piece.tokens).
        self._tokens = 0
        self._prompt_tokens = 0

    # -- producer side (any thread) --------------------------------------------

    def _push(self, item: str | Piece | Finish | BaseException) -> None:
        # The loop may already be closed when a shutdown races the last token.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def push_text(self, text: str) -> None:
        self._push(text)

    def push_piece(self, piece: Piece) -> None:
        self._push(piece)

    def push_finish(self, finish: Finish) -> None:
        self._push(finish)

    def push_error(self, error: BaseException) -> None:
        self._push(error)

    def deliver(self, item: str | Piece | Finish | BaseException) -> None:
        """Like the push_* methods, but called on the event loop (the engine batches its wake-ups)."""
        self._queue.put_nowait(item)

    # -- consumer side (event loop) ----------------------------------------------

    def cancel(self) -> None:
        """Tell the engine nobody listens any more; safe to call at any time, more than once."""
        if not self._cancelled:
            self._cancelled = True
            if not self._finished:
                self._on_cancel()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Output:
        if self._finished:
            raise StopAsyncIteration
        if self._pending is not None:
            item, self._pending = self._pending, None
        else:
            item = await self._queue.get()
        pieces: list[str] = []
        logprobs: list[TokenLogprob] = []
        while True:
            if isinstance(item, BaseException):
                if pieces or logprobs:
                    self._pending = item
                    return self._output(pieces, logprobs)
                self._finished = True
                raise item
            if isinstance(item, Finish):
                self._finished = True
                self._tokens = item.completion_tokens
                self._prompt_tokens = item.prompt_tokens
                return self._output(pieces, logprobs, item)
            if isinstance(item, Piece):
                pieces.append(item.text)
                logprobs.extend(item.logprobs)
                # Counts are cumulative: the last piece merged holds them all.
                self._tokens = max(self._tokens, item.tokens)
                self._prompt_tokens = item.prompt_tokens or self._prompt_tokens
            else:
                pieces.append(item)
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return self._output(pieces, logprobs)

    def _output(self, pieces: list[str], logprobs: list[TokenLogprob], finish: Finish | None = None) -> Output:
        return Output("".join(pieces), finish, tuple(logprobs), self._tokens, self._prompt_tokens)
