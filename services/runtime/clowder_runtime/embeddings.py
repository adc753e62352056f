"""Embeddings: a second llama.cpp context on the loaded model, mean pooling, one sequence per input."""

from __future__ import annotations

import logging
import time
from typing import Any

import llama_cpp
import numpy as np

from clowder_common.errors import FailedPrecondition, InvalidArgument
from clowder_runtime.model import Model

log = logging.getLogger(__name__)

# Inputs evaluated together in one llama_decode (each its own sequence).
EMBED_SEQUENCES = 16


class Embedder:
    """Owns the embedding context. Not thread-safe: the engine calls it from one thread only.

    The context is separate from the generation context, so embedding never
    touches the generation KV cache or its slots; it is made on first use,
    since most deployments never embed.
    """

    def __init__(self, context_size: int, threads: int) -> None:
        self._context_size = context_size
        self._threads = threads
        self._ctx = None
        # llama_cpp's ctypes batch struct, once the context exists (its fields are C arrays mypy cannot index).
        self._batch: Any = None

    def embed(self, model: Model, inputs: list[str]) -> tuple[list[list[float]], int]:
        """L2-normalized mean of the last hidden states over each input's tokens, and the token count."""
        token_lists = []
        for index, text in enumerate(inputs):
            tokens = model.tokenize(text, add_bos=True)
            if not tokens:
                raise InvalidArgument(f"input {index} is empty after tokenization", field=f"inputs[{index}]")
            if len(tokens) > self._context_size:
                raise InvalidArgument(
                    f"input {index} is {len(tokens)} tokens long; the context holds {self._context_size}",
                    field=f"inputs[{index}]",
                )
            token_lists.append(tokens)
        if self._ctx is None:
            self._open(model)
        vectors: list[list[float]] = []
        group: list[list[int]] = []
        for tokens in token_lists:
            # Every sequence of a step must fit the context (and one ubatch: pooling is per ubatch).
            if group and (len(group) == EMBED_SEQUENCES or sum(map(len, group)) + len(tokens) > self._context_size):
                vectors.extend(self._decode(model, group))
                group = []
            group.append(tokens)
        vectors.extend(self._decode(model, group))
        return vectors, sum(map(len, token_lists))

    def _open(self, model: Model) -> None:
        started = time.monotonic()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self._context_size
        params.n_batch = self._context_size
        params.n_ubatch = self._context_size
        params.n_seq_max = EMBED_SEQUENCES
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        # All sequences share the context's cells, so one long input may use all of them.
        params.kv_unified = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise FailedPrecondition("llama.cpp cannot create the embedding context", reason="CONTEXT_FAILED")
        self._ctx = ctx
        self._batch = llama_cpp.llama_batch_init(self._context_size, 0, 1)
        log.info("embedding context ready n_ctx=%d seconds=%.2f", self._context_size, time.monotonic() - started)

    def _decode(self, model: Model, group: list[list[int]]) -> list[list[float]]:
        batch = self._batch
        n = 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                # Pooling reads the hidden state of every token.
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        # The previous group's sequences used the same ids.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} while embedding")
        vectors = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            vector = np.ctypeslib.as_array(pointer, shape=(model.n_embd,)).astype(np.float64)
            norm = np.linalg.norm(vector)
            vectors.append((vector / norm if norm > 0 else vector).tolist())
        return vectors

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
