"""Log probabilities of a generated token and of the likeliest alternatives, from the raw logits."""

from __future__ import annotations

import llama_cpp
import numpy as np

from clowder_runtime.generation import TokenLogprob, TopLogprob
from clowder_runtime.model import Model


def token_logprob(model: Model, ctx: llama_cpp.llama_context_p, index: int, token: int, top: int) -> TokenLogprob:
    """Log-softmax of the logits at batch output `index`, read before the next decode overwrites them.

    These are the model's own probabilities: the sampler chain (temperature, top-p, penalties,
    grammar) works on its own copy, so what it changes does not show here.
    """
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(model.n_vocab,))
    # float64: a sum over ~50k exponentials loses digits in float32.
    values = logits.astype(np.float64)
    peak = values.max()
    logsum = peak + np.log(np.exp(values - peak).sum())
    tops: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(-values, top - 1)[:top]
        best = best[np.argsort(-values[best], kind="stable")]
        tops = tuple(_top(model, int(t), float(values[t] - logsum)) for t in best)
    data = model.piece(token)
    return TokenLogprob(data.decode("utf-8", errors="replace"), float(values[token] - logsum), data, tops)


def _top(model: Model, token: int, logprob: float) -> TopLogprob:
    data = model.piece(token)
    return TopLogprob(data.decode("utf-8", errors="replace"), logprob, data)
