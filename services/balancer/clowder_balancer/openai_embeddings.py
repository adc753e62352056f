"""OpenAI /v1/embeddings on the wire: request checks and the response shape (floats or base64 float32)."""

from __future__ import annotations

import array
import base64
import sys
from dataclasses import dataclass
from typing import Any, Literal, Sequence, cast

from clowder.runtime.v1 import runtime_pb2
from clowder_common.errors import InvalidArgument
from clowder_common.limits import MAX_EMBED_REQUEST_INPUTS


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: Literal["float", "base64"] = "float"


def _bad(param: str, message: str) -> InvalidArgument:
    return InvalidArgument(message, field=param)


def parse_embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "You must provide a model parameter.")
    if "input" not in body or body["input"] is None:
        raise _bad("input", "You must provide an input parameter.")
    value = body["input"]
    if isinstance(value, str):
        inputs: list[Any] = [value]
    elif isinstance(value, list):
        inputs = value
    else:
        raise _bad("input", "Invalid type for 'input': expected a string or an array of strings.")
    if not inputs:
        raise _bad("input", "'input' must not be an empty array.")
    if len(inputs) > MAX_EMBED_REQUEST_INPUTS:
        raise _bad("input", f"'input' takes at most {MAX_EMBED_REQUEST_INPUTS} items.")
    for i, item in enumerate(inputs):
        param = "input" if isinstance(value, str) else f"input[{i}]"
        if isinstance(item, bool) or isinstance(item, (int, list)):
            # Token ids are the client's tokenizer's, which need not be the model's.
            raise _bad(param, "Token arrays are not supported; send the text.")
        if not isinstance(item, str):
            raise _bad(param, f"Invalid type for '{param}': expected a string.")
        if not item:
            raise _bad(param, f"'{param}' must not be an empty string.")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise _bad("encoding_format", "Invalid 'encoding_format': expected 'float' or 'base64'.")
    if body.get("dimensions") is not None:
        raise _bad("dimensions", "'dimensions' is not supported: this model's embeddings have a fixed size.")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "Invalid type for 'user': expected a string.")
    return EmbeddingRequest(model, tuple(inputs), cast(Literal["float", "base64"], encoding))


def _base64(values: Sequence[float]) -> str:
    # OpenAI's base64 form: the float32 values, little-endian, as the official client decodes them.
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embedding_response(model: str, embeddings: Sequence[runtime_pb2.Embedding], prompt_tokens: int,
                       encoding_format: str) -> dict[str, Any]:
    encode = _base64 if encoding_format == "base64" else list
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(e.values)} for i, e in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
