"""Token log probabilities in OpenAI's two shapes: chat (logprobs.content) and legacy completions."""

from __future__ import annotations

from typing import Any, Sequence

from clowder.runtime.v1 import runtime_pb2


def chat_content(entries: Sequence[runtime_pb2.TokenLogprob]) -> list[dict[str, Any]]:
    """choices[].logprobs.content items: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                             for t in e.top_logprobs],
        }
        for e in entries
    ]


def chat_logprobs(entries: Sequence[runtime_pb2.TokenLogprob]) -> dict[str, Any]:
    return {"content": chat_content(entries), "refusal": None}


class LegacyLogprobs:
    """The completions shape {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset} for one
    choice; text_offset counts characters of the generated text, running on across stream chunks."""

    def __init__(self) -> None:
        self.offset = 0

    def shape(self, entries: Sequence[runtime_pb2.TokenLogprob]) -> dict[str, Any]:
        tokens, logprobs, tops, offsets = [], [], [], []
        for e in entries:
            tokens.append(e.token)
            logprobs.append(e.logprob)
            top = {t.token: t.logprob for t in e.top_logprobs}
            # "Up to logprobs+1 elements": the sampled token is always among them.
            top.setdefault(e.token, e.logprob)
            tops.append(top)
            offsets.append(self.offset)
            self.offset += len(e.token)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
