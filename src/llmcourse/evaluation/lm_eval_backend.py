"""lm-evaluation-harness 0.4.13 backend: lm-eval's evaluator runs our loader and our scorer.

Registration: lm-eval 0.4.13 offers external packages its model registry — the ``@register_model(name)``
decorator of ``lm_eval.api.registry`` (a lazy ``model_registry.register(name, target="module:Class")`` works
too). It has no entry-point discovery: its ``MODEL_MAPPING`` lists only its own backends, so the class must be
imported in the process before lm-eval looks the name up (and lm-eval's own ``lm_eval.models`` before it:
``get_model`` registers lm-eval's backends only while the registry is empty). Importing this module registers ``"llmcourse"``;
``python -m llmcourse.evaluation.lm_eval_cli ...`` imports it and then runs lm-eval's own CLI
(``lm_eval.__main__.cli_evaluate``) with the arguments unchanged, e.g.::

    python -m llmcourse.evaluation.lm_eval_cli run --model llmcourse --model_args model=out/gptq \\
        --tasks hellaswag arc_easy --limit 100

``model`` is anything :func:`llmcourse.core.models.load_model` opens (``default``, HF folders, int8 / GPTQ /
fine-tuned folders, ``.gguf`` files), ``dtype`` is ``fp32`` or ``bf16``, ``max_tokens`` is the
packed forward's size in tokens (``eval bench --batch-size``), ``batch_size`` caps the continuation rows of one
forward where the model takes the cached path.

* ``loglikelihood`` — requests grouped by (task, document): each question is one tree of its choices, many
  questions per forward (:class:`~llmcourse.evaluation.scoring.Scorer`), results returned in lm-eval's order;
* ``loglikelihood_rolling`` — lm-eval's disjoint rolling windows (``get_rolling_token_windows`` with context 1,
  ``make_disjoint_window``), each window scored as a (context, continuation) pair, summed per document;
* ``generate_until`` — greedy decoding with transformers' ``generate`` (``max_gen_toks`` from the request or
  256), cut at the first ``until`` string.

This module imports ``lm_eval``; it is only imported where lm-eval is installed (the bench venv), never by the
rest of the package.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own backends first: it fills its registry only while it is empty
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llmcourse.core.models import load_model
from llmcourse.evaluation.scoring import Scorer, prefix_token_id, tok_encode


@register_model("llmcourse")
class LLMCourseLM(LM):
    """An lm-eval model backed by ``load_model(model)`` and the prefix-sharing :class:`Scorer`."""

    def __init__(self, model: str = "default", dtype: str = "fp32", batch_size: int | str = 64,
                 max_gen_toks: int = 256, max_tokens: int | str = 1024, **_: Any) -> None:
        super().__init__()
        self.lm = load_model(str(model), dtype=dtype)
        rows = int(batch_size) if str(batch_size).isdigit() else 64  # "auto" -> our default
        self.scorer = Scorer(self.lm.model, self.lm.tokenizer, max_rows=rows, max_tokens=int(max_tokens))
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "name_or_path", "llmcourse"))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, r in enumerate(requests):
            key = (getattr(r, "task_name", None), getattr(r, "doc_id", None))
            groups.setdefault(key if key != (None, None) else ("#", i), []).append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        idxs = list(groups.values())
        all_scored = self.scorer.score_many([self.scorer.encode([tuple(requests[i].args[:2]) for i in idx])
                                             for idx in idxs])
        for idx, scored in zip(idxs, all_scored, strict=True):
            for i, s in zip(idx, scored, strict=True):
                out[i] = (s.ll, s.is_greedy)
        return [o for o in out if o is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        tok = self.lm.tokenizer
        out = []
        for r in requests:
            (text,) = r.args[:1]
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=tok_encode(tok, text, add_special_tokens=False), prefix_token=prefix_token_id(tok),
                max_seq_len=self.scorer.max_length, context_len=1))
            total = 0.0
            for ctx, cont in windows:
                total += self.scorer.score([(list(ctx), list(cont))])[0].ll
            out.append(total)
        return out

    @torch.inference_mode()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        tok, model = self.lm.tokenizer, self.lm.model
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = tok.decode(tok.eos_token_id) if tok.eos_token_id is not None else None
            if eos and eos not in until:
                until.append(eos)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = tok_encode(tok, context)[-(self.scorer.max_length - n):]
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            text = tok.decode(gen[0, len(ids):], skip_special_tokens=False)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out
