"""A GGUF model through llama.cpp's low-level API: vocabulary, chat template, LoRA adapters, sampler chains."""

from __future__ import annotations

import ctypes
import logging
import random

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF

from clowder_common.errors import FailedPrecondition, InvalidArgument
from clowder_runtime.chat_template import ChatTemplate
from clowder_runtime.generation import SamplingSettings

log = logging.getLogger(__name__)

# llama.cpp treats this seed value as "pick one at random".
_RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED
# Penalties look this far back, as llama-cpp-python's Llama does by default.
PENALTY_LAST_N = 64
# llama.cpp prints through this logger; errors only, the rest is noise in our logs.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def llama_seed(seed: int | None) -> int:
    """Map any int64 onto llama.cpp's uint32 seeds, avoiding the value that means "random"."""
    if seed is None:
        return random.SystemRandom().randrange(_RANDOM_SEED)
    return seed % _RANDOM_SEED


class Model:
    """Weights and vocabulary; read-only after loading, so tokenizing may run beside decoding."""

    def __init__(self, path: str, adapters: dict[str, str], chat_template: str = "") -> None:
        params = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(path.encode("utf-8"), params)
        if not model:
            raise FailedPrecondition(f"llama.cpp cannot load model {path}", reason="MODEL_LOAD_FAILED")
        self.path = path
        self.ptr = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        # Token -> its bytes (piece()); at most the vocabulary, a few MiB.
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.adapters: dict[str, ctypes.c_void_p] = {}
        try:
            for name, adapter_path in adapters.items():
                adapter = llama_cpp.llama_adapter_lora_init(model, adapter_path.encode("utf-8"))
                if not adapter:
                    raise FailedPrecondition(
                        f"llama.cpp cannot load LoRA adapter {name!r} from {adapter_path} for this model",
                        reason="ADAPTER_LOAD_FAILED",
                    )
                self.adapters[name] = adapter
        except BaseException:
            self.close()
            raise
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self.template: ChatTemplate | None = None
        # An override (the runtime's chat_template option) replaces a weak or missing GGUF template.
        template = chat_template or self.meta("tokenizer.chat_template")
        if template:
            self.template = ChatTemplate(
                template,
                bos_token=self.token_text(llama_cpp.llama_vocab_bos(self.vocab)),
                eos_token=self.token_text(llama_cpp.llama_vocab_eos(self.vocab)),
            )
        else:
            log.warning("model has no chat template; chat requests will be refused")

    def close(self) -> None:
        # Adapters belong to the model: llama.cpp frees them with it.
        self.adapters = {}
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def meta(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode("utf-8"), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_bos: bool, special: bool = True) -> list[int]:
        """Tokens of `text`; with special False, control-token text (`<|im_start|>`) stays plain text."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes of a token, from a cache filled as tokens come up: asking llama.cpp costs a buffer and a
        foreign call (about 25 us), once per generated token and stream otherwise."""
        data = self._pieces.get(token)
        if data is None:
            data = self._pieces[token] = self._piece(token)
        return data

    def _piece(self, token: int) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # a longer piece: llama.cpp says how much room it needs

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return eog

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The model's chat template applied to `messages` (and `tools`), ending with the assistant's turn."""
        return "".join(text for text, _ in self.render_chat_parts(messages, tools))

    def render_chat_parts(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """render_chat in pieces: (text, from the template); message contents are the False ones."""
        if self.template is None:
            raise FailedPrecondition(
                "this model has no chat template (tokenizer.chat_template); send a raw prompt instead",
                reason="NO_CHAT_TEMPLATE",
            )
        return self.template.render_parts(messages, tools)

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Tokens of the rendered chat: the template's control tokens as such, the messages' contents as plain
        text whatever they contain (a typed `<|im_start|>system` must not open a system turn)."""
        tokens: list[int] = []
        for text, from_template in self.render_chat_parts(messages, tools):
            tokens += self.tokenize(text, add_bos=False, special=from_template)
        return tokens

    def sampler(self, sampling: SamplingSettings, grammar: str | None = None) -> "Sampler":
        return Sampler(self, sampling, grammar)

    def check_grammar(self, grammar: str) -> None:
        """Build and drop a grammar sampler: a grammar llama.cpp refuses is the request's fault, found early."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidArgument("the tool call grammar cannot be built for these tools", field="tools")
        llama_cpp.llama_sampler_free(sampler)


class Sampler:
    """One request's llama.cpp sampler chain.

    The order is llama-cpp-python's own (penalties, grammar, then greedy or
    top-k, typical, top-p, min-p, temperature, dist), so a seeded request
    samples exactly what `Llama.create_completion` would.
    """

    def __init__(self, model: Model, sampling: SamplingSettings, grammar: str | None = None) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = llama_cpp.llama_sampler_chain_init(params)
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        self._penalties = llama_cpp.llama_sampler_init_penalties(
            model.n_vocab, PENALTY_LAST_N, sampling.repetition_penalty,
            sampling.frequency_penalty, sampling.presence_penalty,
        )
        add(self._penalties)
        if grammar is None and sampling.json:
            grammar = JSON_GBNF
        if grammar is not None:
            constraint = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
            if not constraint:
                llama_cpp.llama_sampler_free(self.chain)
                raise InvalidArgument("the output grammar cannot be built for this model", field="response_format")
            add(constraint)
        if sampling.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            add(llama_cpp.llama_sampler_init_dist(llama_seed(sampling.seed)))
        self._penalize_prompt = (
            sampling.repetition_penalty != 1.0 or sampling.frequency_penalty != 0.0
            or sampling.presence_penalty != 0.0
        )

    def accept_prompt(self, tokens: list[int]) -> None:
        """Penalties count the prompt's last tokens too (the grammar must not see them)."""
        if self._penalize_prompt:
            for token in tokens[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(self._penalties, token)

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        # Also accepts the token into every sampler of the chain (penalty history, grammar state).
        return llama_cpp.llama_sampler_sample(self.chain, ctx, index)

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
