"""Mid-stream failover: what a client was already sent, and the request that continues it on another replica."""

from __future__ import annotations

from clowder.runtime.v1 import runtime_pb2

# The runtime's max_tokens when neither the request nor the aimage sets one (clowder_runtime.validation).
RUNTIME_DEFAULT_MAX_TOKENS = 256
# Odd 64-bit constant (2^64 / golden ratio): consecutive token counts give seeds far apart.
_SEED_STEP = 0x9E3779B97F4A7C15


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


def derived_seed(seed: int, tokens: int) -> int:
    """The seed a seeded generation continues with after `tokens` tokens: the same request broken at the
    same point continues the same way, and the continuation does not replay the first replica's random draws
    (0 tokens: the original seed, as a restart from scratch is the same generation)."""
    return _wrap_int64(seed + tokens * _SEED_STEP)


def resolved_max_tokens(request: runtime_pb2.GenerateRequest, image_max_tokens: int) -> int:
    """The max_tokens the runtime applies: the request's, else the aimage's, else the runtime default."""
    if request.sampling.HasField("max_tokens") and request.sampling.max_tokens:
        return request.sampling.max_tokens
    return image_max_tokens or RUNTIME_DEFAULT_MAX_TOKENS


class Progress:
    """What one generation's client has been sent, over every replica that served it.

    Messages pass through relay(), which makes a continuation's counts read as one generation's: the
    cumulative completion_tokens and the last message's usage count what the client received (prompt
    tokens of the original prompt, completion tokens of every replica added up).
    """

    def __init__(self, request: runtime_pb2.GenerateRequest, max_tokens: int) -> None:
        self.request = request
        self.max_tokens = max_tokens
        self._texts: list[str] = []
        # Completion tokens the client has been sent (cumulative over replicas).
        self.tokens = 0
        # Tokens the replicas before the current one produced.
        self._base = 0
        # Of the original prompt, as the first replica counted it (0: not known).
        self.prompt_tokens = 0
        self._logprobs_sent = False
        self.continuations = 0

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def sent_anything(self) -> bool:
        return bool(self._texts) or self._logprobs_sent

    def relay(self, message: runtime_pb2.GenerateResponse) -> runtime_pb2.GenerateResponse:
        """`message` (changed in place) as the client must see it; remembers what it carries."""
        if self.continuations == 0:
            if message.prompt_tokens and not self.prompt_tokens:
                self.prompt_tokens = message.prompt_tokens
        else:
            if message.completion_tokens:
                message.completion_tokens += self._base
            if self.prompt_tokens:
                message.prompt_tokens = self.prompt_tokens
            if message.HasField("usage"):
                usage = message.usage
                usage.completion_tokens += self._base
                if self.prompt_tokens:
                    # The continuation's prompt held the text already sent; the client's prompt did not.
                    usage.prompt_tokens = self.prompt_tokens
                    usage.cached_prompt_tokens = min(usage.cached_prompt_tokens, self.prompt_tokens)
        if message.text:
            self._texts.append(message.text)
        if message.logprobs:
            self._logprobs_sent = True
        if message.completion_tokens:
            self.tokens = message.completion_tokens
        return message

    def refusal(self) -> str:
        """Why this generation cannot be continued elsewhere ("" when it can)."""
        if not self._texts:
            return ""  # nothing of the answer was sent: a restart is a continuation of nothing
        sampling = self.request.sampling
        if sampling.response_format == runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT:
            # The JSON grammar starts at the answer's first character: it cannot take up a partial value.
            return "response_format json_object"
        if self.request.HasField("chat") and self.request.chat.tool_choice.mode in (
            runtime_pb2.ToolChoice.MODE_REQUIRED, runtime_pb2.ToolChoice.MODE_FUNCTION
        ):
            return "a forced tool call"
        return ""

    def begin_continuation(self) -> runtime_pb2.GenerateRequest | None:
        """The request that continues the generation from what was sent; None when no token is left
        (the client had everything but the last message)."""
        self.continuations += 1
        if not self.sent_anything:
            # The client saw nothing: start over (held-back tokens were never shown, so they do not count).
            self.tokens = 0
        self._base = self.tokens
        remaining = self.max_tokens - self.tokens
        if remaining <= 0:
            return None
        return continuation_request(self.request, self.text, self.tokens, remaining)

    def length_finish(self) -> runtime_pb2.GenerateResponse:
        """The last message of a generation whose replica died after its last token but before its end."""
        return runtime_pb2.GenerateResponse(
            finish_reason=runtime_pb2.FINISH_REASON_LENGTH, completion_tokens=self.tokens,
            prompt_tokens=self.prompt_tokens,
            usage=runtime_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.tokens),
        )


def continuation_request(request: runtime_pb2.GenerateRequest, sent: str, tokens: int, remaining: int
                         ) -> runtime_pb2.GenerateRequest:
    """`request` continued after `sent` (the text the client got, `tokens` tokens of it): for chat the partial
    assistant message is continued (ChatInput.assistant_prefix), for a completion the prompt grows by it;
    `remaining` tokens at most; the same stop strings; a seed derived from the request's and `tokens`."""
    out = runtime_pb2.GenerateRequest()
    out.CopyFrom(request)
    if sent:
        if out.HasField("chat"):
            out.chat.assistant_prefix = request.chat.assistant_prefix + sent
        else:
            out.prompt = request.prompt + sent
    if tokens or request.sampling.HasField("max_tokens"):
        out.sampling.max_tokens = remaining
    if request.sampling.HasField("seed"):
        out.sampling.seed = derived_seed(request.sampling.seed, tokens)
    return out
