"""The generation loop: greedy, beam search and sampling over a KV cache, with stop strings and streaming.

One prompt at a time. The loop is the textbook autoregressive one: run the prompt once
(prefill), then feed back one token per step, reusing the cached keys and values

    z_t = f(y_<t);   greedy: y_t = argmax_v z'_t,v;   sampling: y_t ~ softmax(z'_t)

where ``z'`` are the logits after the sampler chain (:mod:`llmcourse.decoding.samplers`;
greedy and beam search apply only its penalties, as transformers does). Beam search is in
:mod:`llmcourse.decoding.beam`. Greedy and beam results are token-identical to transformers'
``generate()``; sampling with the ``hf`` chain draws the same tokens as ``generate(do_sample=True)``
for the same seed, because the processed distribution and the RNG stream are the same.

Two backends run the model: ``fast`` (the runtime's :class:`~llmcourse.core.runtime.FastModel`, for
every architecture in :data:`llmcourse.core.runtime.SUPPORTED`, including models whose linears another
lab swapped for its own modules) and ``hf`` (any causal LM through its own module and ``DynamicCache``).
``auto`` picks ``fast`` when it can.

Scores reported per sequence: greedy and sampling give the log-likelihood of the generated
tokens under the model, ``sum_t log softmax(z_t)_{y_t}`` (unprocessed logits); beam search gives
transformers' ``sequences_scores`` (length-normalised sum of processed log-probabilities).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.runtime import DecodeSession, FastModel, held_runtime, runtime_for, supports
from llmcourse.decoding import samplers
from llmcourse.decoding.beam import BeamRecorder, beam_search

log = logging.getLogger(__name__)

STRATEGIES = ("greedy", "beam", "sample")
MAX_NEW_TOKENS = 1_000_000  # further bounded by the model's context at generation time
MAX_ROWS = 64  # beams or returned sequences
BACKENDS = ("auto", "fast", "hf")


def parse_early_stopping(value: str | bool) -> bool | str:
    """``true`` / ``false`` / ``never`` (CLI spelling) -> transformers' ``True`` / ``False`` / ``"never"``."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    if v == "never":
        return "never"
    raise UserError(f"--early-stopping must be true, false or never, got {value!r}", "pass one of true|false|never")


@dataclass
class GenerationConfig(samplers.SamplerSettings):
    """Every knob of a generation; validated on creation (bad values raise UserError naming the flag).

    The sampler-chain numbers (temperature, top-k, top-p, min-p, typical-p, epsilon, eta, the
    penalties, no-repeat-ngram) are the fields of :class:`~llmcourse.decoding.samplers.SamplerSettings`,
    inherited; ``top_k`` defaults to 0, off (transformers' GenerationConfig defaults to 50, llama.cpp to 40).
    """

    strategy: str = option("greedy", "greedy (argmax), beam (beam search) or sample (with the sampler chain). "
                           "Default: %(default)s", choices=STRATEGIES)
    max_new_tokens: int = option(32, "most tokens to generate. Default: %(default)s")
    num_beams: int = option(4, "beams for --strategy beam. Default: %(default)s")
    length_penalty: float = option(1.0, "beam score = sum log p / length^X (0: no normalisation). "
                                   "Default: %(default)s")
    early_stopping: bool | str = option(False, "beam search stop rule, as transformers: true = stop when "
                                        "num-beams hypotheses are finished; false = heuristic; never = exact "
                                        "bound. Default: false", type=parse_early_stopping,
                                        metavar="true|false|never")
    num_return_sequences: int = option(1, "sequences to return (beam: the best R of the beams; sample: R "
                                       "independent samples). Default: %(default)s")
    chain: str = option("hf", "sampler order: hf (transformers: temperature first) or llama.cpp (penalties, "
                        "top-k, typical, top-p, min-p, temperature last). Default: %(default)s",
                        choices=list(samplers.CHAINS))
    seed: int | None = option(None, "random seed for sampling (default: not fixed)")
    stop: tuple[str, ...] = option((), "stop when this text appears (repeatable); the text is cut before it "
                                   "(default: none)", action="append", metavar="TEXT")
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's generation config
    backend: str = option("auto", "fast (our Llama forward), hf (the model's own module) or auto. "
                          "Default: %(default)s", choices=BACKENDS)

    def __post_init__(self) -> None:
        def bad(flag: str, value: Any, want: str) -> UserError:
            return UserError(f"{flag} {value!r} is invalid", f"pass {flag} {want}")

        self.early_stopping = parse_early_stopping(self.early_stopping)
        self.stop = tuple(self.stop or ())
        finite = math.isfinite
        checks = [
            ("--strategy", self.strategy, self.strategy in STRATEGIES, "greedy|beam|sample"),
            ("--max-new-tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int)
             and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"between 1 and {MAX_NEW_TOKENS:,}"),
            ("--num-beams", self.num_beams, isinstance(self.num_beams, int) and 1 <= self.num_beams <= MAX_ROWS,
             f"between 1 and {MAX_ROWS}"),
            ("--length-penalty", self.length_penalty, finite(self.length_penalty) and abs(self.length_penalty) <= 100,
             "between -100 and 100"),
            ("--num-return-sequences", self.num_return_sequences,
             isinstance(self.num_return_sequences, int) and 1 <= self.num_return_sequences <= MAX_ROWS,
             f"between 1 and {MAX_ROWS}"),
            ("--temperature", self.temperature, finite(self.temperature) and 1e-3 <= self.temperature <= 1e3,
             "between 0.001 and 1000 (for deterministic output use --strategy greedy)"),
            ("--top-k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("--top-p", self.top_p, 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("--min-p", self.min_p, 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("--typical-p", self.typical_p, 0.0 < self.typical_p <= 1.0, "in (0, 1]"),
            ("--epsilon", self.epsilon, 0.0 <= self.epsilon < 1.0, "in [0, 1)"),
            ("--eta", self.eta, 0.0 <= self.eta < 1.0, "in [0, 1)"),
            ("--repetition-penalty", self.repetition_penalty,
             finite(self.repetition_penalty) and 1e-3 <= self.repetition_penalty <= 1e3,
             "between 0.001 and 1000 (1 turns it off)"),
            ("--frequency-penalty", self.frequency_penalty,
             finite(self.frequency_penalty) and abs(self.frequency_penalty) <= 100, "between -100 and 100"),
            ("--presence-penalty", self.presence_penalty,
             finite(self.presence_penalty) and abs(self.presence_penalty) <= 100, "between -100 and 100"),
            ("--penalty-last-n", self.penalty_last_n, isinstance(self.penalty_last_n, int)
             and 0 <= self.penalty_last_n <= MAX_NEW_TOKENS, "between 0 (the whole context) and 1,000,000"),
            ("--no-repeat-ngram-size", self.no_repeat_ngram_size,
             isinstance(self.no_repeat_ngram_size, int) and 0 <= self.no_repeat_ngram_size <= 1000,
             "between 0 (off) and 1000"),
            ("--chain", self.chain, self.chain in samplers.CHAINS, "|".join(samplers.CHAINS)),
            ("--seed", self.seed, self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), ">= 0"),
            ("--stop", self.stop, all(isinstance(s, str) and s for s in self.stop), "as non-empty strings"),
            ("--backend", self.backend, self.backend in BACKENDS, "|".join(BACKENDS)),
        ]
        for flag, value, ok, want in checks:
            if not ok:
                raise bad(flag, value, want)
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise UserError(f"--num-return-sequences {self.num_return_sequences} is larger than --num-beams "
                            f"{self.num_beams}", "pass --num-return-sequences <= --num-beams")
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            raise UserError("greedy search returns one sequence",
                            "pass --num-return-sequences 1, or use --strategy beam or sample")


@dataclass
class GeneratedSequence:
    token_ids: list[int]  # generated tokens only
    text: str
    score: float
    finish_reason: str  # "eos" | "length" | "stop"


@dataclass
class StepRecord:
    """What one greedy/sampling step saw (for the probability bar charts and trees)."""

    top_ids: list[int]  # most likely tokens of the model's distribution, best first
    top_probs: list[float]  # their probabilities under the model
    processed_probs: list[float]  # their probabilities after the sampler chain (0 = filtered out)
    kept: int  # tokens left with probability > 0 after the chain
    chosen: int
    chosen_prob: float  # model probability of the chosen token


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    sequences: list[GeneratedSequence]
    seconds: float
    steps: int  # decoding steps (forward passes after the prompt, plus one)
    backend: str
    records: list[list[StepRecord]] = field(default_factory=list)  # per returned sequence, if record=True
    beam: BeamRecorder | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        """The CLI contract's object."""
        return {
            "prompt_token_ids": self.prompt_token_ids,
            "sequences": [{"token_ids": s.token_ids, "text": s.text, "score": s.score} for s in self.sequences],
            "tokens_per_second": self.tokens_per_second,
        }


# --- backends ------------------------------------------------------------------------------------

class HFDecoder:
    """Any transformers causal LM through its own forward and ``DynamicCache``, as ``generate()`` calls it."""

    name = "hf"

    def __init__(self, model: Any) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5.24 renamed ``past_key_values`` to ``cache``; accept both spellings
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache: Any = None

    def _forward(self, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self.cache}, **kw)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def start(self, ids: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
        from transformers import DynamicCache

        ids = ids.repeat(rows, 1)  # as generate() does for beams: the prompt is run once per beam
        self.cache = DynamicCache(config=self.model.config)
        return self._forward(ids, **self._keep)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens.view(-1, 1))

    def reorder(self, rows: torch.Tensor) -> None:
        if not torch.equal(rows, torch.arange(rows.shape[0])):
            self.cache.reorder_cache(rows)

    def warmup(self, rows: int, capacity: int) -> None:
        """Nothing to prepare: transformers' modules run eagerly."""


class FastDecoder:
    """The runtime's :class:`~llmcourse.core.runtime.FastModel` behind the decoder interface (one prompt
    row, expanded for beams). The weights (``fast``) are shared by every decoder of a model; each
    :meth:`start` opens a new :class:`~llmcourse.core.runtime.DecodeSession`, so this decoder's state is
    its own.
    """

    name = "fast"

    def __init__(self, fast: FastModel) -> None:
        self.fast = fast
        self.session: DecodeSession | None = None

    def start(self, ids: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
        self.session = self.fast.session(ids.shape[0], capacity)
        logits = self.session.prefill(ids)
        if rows > 1:
            self.session.expand(rows)
            logits = logits.expand(rows, -1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.session.step(tokens)

    def reorder(self, rows: torch.Tensor) -> None:
        self.session.reorder(rows)

    def warmup(self, rows: int, capacity: int) -> None:
        self.fast.warmup(rows, capacity)


COMPILE_MIN_STEPS = 48  # shorter generations take the uncompiled step: compiling (2-5 s) would not pay off


def prepare(model: Any, matvec: str = "auto") -> FastModel:
    """The runtime's :class:`~llmcourse.core.runtime.FastModel` of ``model`` (built once per step path and
    held by the model, reused while it is unchanged: :func:`~llmcourse.core.runtime.runtime_for`).

    ``matvec="compiled"`` runs each decode step through ``torch.compile``'d layers (compiled on first
    use, a few seconds, cached on disk by Inductor afterwards); ``"mm"`` needs no compilation;
    ``"auto"`` compiles for models of 32 MB and more (:func:`~llmcourse.core.runtime.auto_matvec`).
    """
    return runtime_for(model, matvec)


def _compiled_ready(model: Any) -> bool:
    """Whether ``model`` already has a compiled step that has run (so using it costs nothing more)."""
    fast = held_runtime(model, "compiled")
    return fast is not None and fast.warm


def make_decoder(model: Any, backend: str = "auto", steps: int | None = None) -> HFDecoder | FastDecoder:
    """Pick the backend: ``fast`` for the runtime's architectures, else ``hf``.

    ``steps`` (rows x new tokens, when known): a generation shorter than ``COMPILE_MIN_STEPS`` takes
    the uncompiled fast step unless a compiled one is already warm for this model.
    """
    if isinstance(model, FastModel):
        return FastDecoder(model)
    if backend == "fast" and not supports(model):
        raise UserError(f"the fast backend does not support {type(model).__name__}", "pass --backend hf or auto")
    if backend in ("auto", "fast") and supports(model):
        short = steps is not None and steps < COMPILE_MIN_STEPS and not _compiled_ready(model)
        return FastDecoder(prepare(model, "mm" if short else "auto"))
    return HFDecoder(model)


# --- sampling defaults ------------------------------------------------------------------------------

# What `llmcourse chat` samples with, and what the server uses for requests that set no sampling field when
# the model has no generation_config.json: plain temperature-1 sampling of a small model wanders off into
# other languages ("The capital of France?" -> "PréférencesSaint-Germain-..."). With top-p 0.9 and the
# repetition penalty, the default model answered "Paris" in 6 of 10 seeded samples at temperature 0.7 and in
# 10 of 10 at 0.5 (and at 0.3): 0.5 keeps some variety and answers.
CHAT_DEFAULTS = {"strategy": "sample", "max_new_tokens": 256, "temperature": 0.5, "top_p": 0.9,
                 "repetition_penalty": 1.1, "penalty_last_n": 64}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: Any) -> dict[str, Any]:
    """The sampling settings a model's authors chose (``generation_config.json`` in ``model_dir``, where it
    exists and samples), else the chat command's (:data:`CHAT_DEFAULTS`)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    chat = {k: v for k, v in CHAT_DEFAULTS.items() if k in (*SAMPLING_KEYS, "penalty_last_n")}
    if path is None or not path.is_file():
        return {**chat, "source": "chat defaults"}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {**chat, "source": "chat defaults"}
    ok = {k: cfg[k] for k in SAMPLING_KEYS
          if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg.get(k), bool)}
    if not isinstance(cfg, dict) or cfg.get("do_sample") is False or "temperature" not in ok:
        return {**chat, "source": "chat defaults"}
    return {**ok, "source": str(path)}


# --- text ----------------------------------------------------------------------------------------

class TextStream:
    """Incremental detokenization with stop strings: emits only text that is final."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly final text ('' if none). Sets ``stopped`` on a stop string."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, text[:cut]
            return self._emit(len(self.text))
        self.text = text
        end = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            end = min(end, len(text.rstrip("\ufffd")))
        return self._emit(end)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


def text_stream(tokenizer: Any, cfg: GenerationConfig, on_text: Callable[[str], None] | None) -> TextStream | None:
    """A :class:`TextStream` for one sequence when its text is streamed or stop strings are watched, else None."""
    return TextStream(tokenizer, cfg.stop) if tokenizer is not None and (on_text or cfg.stop) else None


def push_stream(stream: TextStream | None, tok: int, on_text: Callable[[str], None] | None) -> bool:
    """Feed one token to the stream (if any), handing ``on_text`` the text that became final; True on a stop string."""
    if stream is None:
        return False
    piece = stream.push(tok)
    if piece and on_text is not None:
        on_text(piece)
    return stream.stopped


def flush_stream(stream: TextStream | None, on_text: Callable[[str], None] | None) -> None:
    """At a sequence's end, hand ``on_text`` the text the stream still held back (a stop string's margin)."""
    if stream is not None and on_text is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)


def sequence_text(stream: TextStream | None, tokenizer: Any, toks: list[int]) -> str:
    """A sequence's text: its stream's (cut at a stop string), else its tokens decoded ('' without a tokenizer)."""
    if stream is not None:
        return stream.text
    return tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else ""


def check_prompt_text(prompt: str) -> None:
    """A one-line error for a prompt that is not text a tokenizer can read (a lone surrogate)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid text (it holds a lone surrogate character)",
                        "pass the prompt as UTF-8 text") from None


def encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Token ids of ``prompt`` (a string is tokenized with the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        check_prompt_text(prompt)
        ids = tokenizer(prompt).input_ids
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UserError("the prompt is empty", "pass a non-empty --prompt")
        ids = [bos]
    return ids


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template applied to ``messages``, ready for the assistant's turn."""
    from llmcourse.core.chat_template import chat_ids

    ids = chat_ids(tokenizer, messages)  # rendered in the sandbox with limits; errors name the template's file
    if ids is None:
        raise UserError("this model's tokenizer has no chat template",
                        "pass --chat-template FILE or --chat-template none, or use `llmcourse generate` with a plain prompt")
    return ids


def model_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config (as ``generate()`` uses), else the tokenizer's."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def check_fits(model: Any, prompt_ids: list[int], cfg: GenerationConfig) -> None:
    """Refuse a generation the model cannot hold: token ids outside the vocabulary, prompt plus new
    tokens beyond its context, or a KV cache larger than the memory there is."""
    mcfg = getattr(model, "config", None)
    vocab = getattr(mcfg, "vocab_size", None)
    if vocab and any(not 0 <= t < vocab for t in prompt_ids):
        raise UserError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})", "pass valid token ids")
    ctx = getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None)
    total = len(prompt_ids) + cfg.max_new_tokens
    if ctx and len(prompt_ids) >= ctx:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens, as many as the model's context of {ctx}",
                        f"shorten the prompt to under {ctx} tokens")
    if ctx and total > ctx:
        raise UserError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {cfg.max_new_tokens} exceeds "
                        f"the model's context of {ctx} tokens",
                        f"pass --max-new-tokens {max(1, ctx - len(prompt_ids))} or less, or a shorter prompt")
    if mcfg is None:
        return
    rows = cfg.num_beams if cfg.strategy == "beam" else 1
    layers = getattr(mcfg, "num_hidden_layers", None) or getattr(mcfg, "n_layer", 0) or 0
    heads = getattr(mcfg, "num_attention_heads", None) or getattr(mcfg, "n_head", 1) or 1
    kv = getattr(mcfg, "num_key_value_heads", None) or heads
    hidden = getattr(mcfg, "hidden_size", None) or getattr(mcfg, "n_embd", 0) or 0
    head_dim = getattr(mcfg, "head_dim", None) or hidden // heads
    need = 2 * layers * rows * kv * head_dim * total * 4 + rows * (vocab or 0) * 4 * 4
    avail = _available_memory()
    if avail is not None and need > avail:
        raise UserError(f"this generation needs about {need / 2**30:.1f} GiB for its cache, more than the "
                        f"{avail / 2**30:.1f} GiB available", "lower --max-new-tokens or --num-beams")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# --- the loop ------------------------------------------------------------------------------------

def _record(scores: torch.Tensor, processed: torch.Tensor, chosen: int, n: int = 30) -> StepRecord:
    probs = torch.softmax(scores[0], dim=-1)
    pprobs = torch.softmax(processed[0], dim=-1)
    top = torch.topk(probs, min(n, probs.shape[-1]))
    return StepRecord(top.indices.tolist(), top.values.tolist(), pprobs[top.indices].tolist(),
                      int((pprobs > 0).sum()), chosen, float(probs[chosen]))


def _one_sequence(decoder: Any, prompt: list[int], cfg: GenerationConfig, eos: set[int],
                  stream: TextStream | None, on_text: Callable[[str], None] | None,
                  generator: torch.Generator | None, record: bool) -> tuple[list[int], float, str, list[StepRecord]]:
    sampling = cfg.strategy == "sample"
    order = samplers.CHAINS[cfg.chain]
    ids = torch.tensor([prompt], dtype=torch.long)
    out: list[int] = []
    score, reason, records = 0.0, "length", []
    logits = decoder.start(ids, 1, len(prompt) + cfg.max_new_tokens)
    for step in range(cfg.max_new_tokens):
        scores = logits.float()
        processed = samplers.apply_chain(scores, ids, cfg, order, sampling=sampling)
        if sampling:
            tok = int(samplers.sample(torch.softmax(processed, dim=-1), generator)[0])
        else:
            tok = int(torch.argmax(processed, dim=-1)[0])
        score += float(torch.log_softmax(scores[0], dim=-1)[tok])
        if record:
            records.append(_record(scores, processed, tok))
        out.append(tok)
        ids = torch.cat((ids, torch.tensor([[tok]])), dim=1)
        if push_stream(stream, tok, on_text):
            reason = "stop"
            break
        if tok in eos:
            reason = "eos"
            break
        if step + 1 < cfg.max_new_tokens:
            logits = decoder.step(torch.tensor([tok]))
    flush_stream(stream, on_text)
    return out, score, reason, records


def generate(model: Any, tokenizer: Any, prompt: str | list[int], config: GenerationConfig | None = None,
             *, on_text: Callable[[str], None] | None = None, record: bool = False) -> GenerationOutput:
    """Generate from ``prompt`` with ``config``; ``on_text`` receives text pieces as they become final.

    ``model`` is a transformers causal LM (or a prepared :class:`FastModel`); ``record`` keeps the
    per-step distributions (greedy/sample) or the beam candidates (beam) for the plots.
    """
    cfg = config or GenerationConfig()
    prompt_ids = encode_prompt(tokenizer, prompt)
    check_fits(model, prompt_ids, cfg)
    eos_list = list(cfg.eos_token_ids) if cfg.eos_token_ids is not None else model_eos_ids(model, tokenizer)
    rows = cfg.num_beams if cfg.strategy == "beam" else 1
    # builds FastModel once per model, outside the timing
    runs = rows if cfg.strategy == "beam" else cfg.num_return_sequences
    decoder = make_decoder(model, cfg.backend, steps=runs * cfg.max_new_tokens)
    decoder.warmup(rows, len(prompt_ids) + cfg.max_new_tokens)  # compiles the fast step, outside the timing
    t0 = time.perf_counter()
    sequences: list[GeneratedSequence] = []
    records: list[list[StepRecord]] = []
    beam_rec = None
    steps = 0
    with torch.inference_mode():
        if cfg.strategy == "beam":
            order = samplers.CHAINS[cfg.chain]
            needs = any(getattr(cfg, a) != d for a, d in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0),
                                                                 ("presence_penalty", 0.0), ("no_repeat_ngram_size", 0)))

            def process(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
                return samplers.apply_chain(logprobs, ids, cfg, order, sampling=False)

            beam_rec = BeamRecorder() if record else None
            res = beam_search(decoder, prompt_ids, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                              eos_token_ids=eos_list, length_penalty=cfg.length_penalty,
                              early_stopping=cfg.early_stopping, num_return_sequences=cfg.num_return_sequences,
                              process=process if needs else None, recorder=beam_rec)
            steps = res.steps
            for toks, sc in zip(res.token_ids, res.scores, strict=True):
                text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else ""
                reason = "eos" if toks and toks[-1] in eos_list else "length"
                for s in cfg.stop:  # stop strings cut beam results afterwards
                    if s in text:
                        text, reason = text[:text.index(s)], "stop"
                sequences.append(GeneratedSequence(toks, text, sc, reason))
        else:
            n = cfg.num_return_sequences
            generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
            for i in range(n):
                stream = text_stream(tokenizer, cfg, on_text)
                toks, sc, reason, rec = _one_sequence(decoder, prompt_ids, cfg, set(eos_list), stream,
                                                      on_text if i == 0 else None, generator, record)
                text = sequence_text(stream, tokenizer, toks)
                sequences.append(GeneratedSequence(toks, text, sc, reason))
                records.append(rec)
                steps += len(toks)
    seconds = time.perf_counter() - t0
    return GenerationOutput(prompt_ids, sequences, seconds, steps, decoder.name, records, beam_rec)
