"""Speculative decoding: our plain greedy, prompt lookup and draft-model decoding vs transformers' assisted
generation (``prompt_lookup_num_tokens=`` and ``assistant_model=``), on the same prompts, in one run.

Two workloads on the default model (SmolLM2-135M-Instruct, fp32, chat template):

* input-grounded: a Wikipedia extract from the default texts (``llmcourse.core.data``) in the prompt, and a
  request to summarise it (the answer copies spans of the input: what prompt lookup is for);
* open-ended: a story or an explanation with nothing to copy (lookup should cost next to nothing).

The draft model is the default model cut to its first ``--draft-layers`` decoder layers (its embedding,
final norm and head kept: the same tokenizer), shared by both implementations. Every generation is forced
to ``--new`` tokens (EOS does not stop it: ``eos_token_ids=()`` / ``min_new_tokens``), greedy. Tokens/s
is new tokens over the generation's time (the prompt's forward included, as a user waits for it); our
speculative output is checked token-identical to our plain greedy. The methods run interleaved (each round
runs every method once per prompt) and the ratios are medians over prompts and rounds of per-round ratios,
so a busy machine slows both sides of a ratio alike.

Speculative decoding speeds up the tokens after the first, not the prompt's forward, which is a large part
of a 64-token answer to a long prompt (a 300-token prompt costs about as much as 30 one-token steps on one
thread). So each round also times each implementation's first token alone (``max_new_tokens=1``), and the
table adds the speed-up of the decoding after it: ``(T_plain - T_first) / (T_method - T_first)``.

    .venv/bin/python bench/speculative.py [--rounds 2] [--new 64] [--threads 1] [--draft-layers 8] [--no-draft]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, write_result  # noqa: E402

from llmcourse.core.data import load_texts  # noqa: E402
from llmcourse.core.models import load_model  # noqa: E402
from llmcourse.decoding import (  # noqa: E402
    GenerationConfig,
    SpeculativeConfig,
    chat_prompt_ids,
    generate,
    speculative_generate,
)

OPEN_ENDED = ["Write a short story about a robot who learns to paint.",
              "Explain why the sky is blue to a ten-year-old."]


def grounded_requests(n: int) -> list[str]:
    texts = [t for t in load_texts("default", split="eval") if 700 < len(t) < 1500][:n]
    return [f"{t}\n\nSummarise the text above in a few sentences." for t in texts]


def truncated(model, layers: int):
    """The model with its first ``layers`` decoder layers only, sharing every tensor with it."""
    import copy

    from torch import nn
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(config)
    small.model.embed_tokens, small.model.norm = model.model.embed_tokens, model.model.norm
    small.model.rotary_emb, small.lm_head = model.model.rotary_emb, model.lm_head
    small.model.layers = nn.ModuleList(list(model.model.layers)[:layers])
    small.generation_config = model.generation_config
    return small.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per workload")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--draft-tokens", type=int, default=SpeculativeConfig.draft_tokens,
                    help="lookup: the most drafted tokens per round (the length is chosen per round)")
    ap.add_argument("--model-draft-tokens", type=int, default=3,
                    help="--speculative draft: tokens the draft model drafts per round")
    ap.add_argument("--lookup-ngram", type=int, default=SpeculativeConfig.lookup_ngram)
    ap.add_argument("--hf-lookup-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-draft", action="store_true", help="skip the draft-model rows (both implementations)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    model, tok = lm.model, lm.tokenizer
    draft = truncated(model, args.draft_layers)
    workloads = {"input-grounded": grounded_requests(args.prompts), "open-ended": OPEN_ENDED[:args.prompts]}
    prompts = {w: [chat_prompt_ids(tok, [{"role": "user", "content": r}]) for r in reqs]
               for w, reqs in workloads.items()}
    cfg = GenerationConfig(max_new_tokens=args.new, eos_token_ids=())
    lookup = SpeculativeConfig("lookup", draft_tokens=args.draft_tokens, lookup_ngram=args.lookup_ngram)
    spec_draft = SpeculativeConfig("draft", draft_tokens=args.model_draft_tokens, draft_model="truncated")

    def hf(ids: list[int], **kw) -> tuple[float, list[int]]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False, **kw)
            dt = time.perf_counter() - t0
        return args.new / dt, out[0, len(ids):].tolist()

    methods = {
        "ours plain": lambda ids: generate(model, tok, ids, cfg),
        "ours lookup": lambda ids: speculative_generate(model, tok, ids, cfg, lookup),
        "ours draft": lambda ids: speculative_generate(model, tok, ids, cfg, spec_draft, draft_model=draft),
    }
    hf_methods = {} if args.no_hf else {
        "hf plain": lambda ids: hf(ids),
        "hf lookup": lambda ids: hf(ids, prompt_lookup_num_tokens=args.hf_lookup_tokens),
        "hf draft": lambda ids: hf(ids, assistant_model=draft),
    }
    if args.no_draft:
        del methods["ours draft"]
        hf_methods.pop("hf draft", None)
    first_cfg = GenerationConfig(max_new_tokens=1, eos_token_ids=())

    def first_token(ids: list[int]) -> dict[str, float]:
        """Seconds to the first token alone (the prompt's forward), ours and transformers'."""
        out = {"ours": generate(model, tok, ids, first_cfg).seconds}
        if hf_methods:
            x = torch.tensor([ids])
            with torch.inference_mode():
                t0 = time.perf_counter()
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
                out["hf"] = time.perf_counter() - t0
        return out

    # our generate() and speculative_generate() compile their step before they start the clock; transformers
    # gets one short warm-up generation of each kind
    if hf_methods:
        first = prompts["open-ended"][0]
        with torch.inference_mode():
            for kw in ({}, {"prompt_lookup_num_tokens": 2}, {"assistant_model": draft}):
                model.generate(torch.tensor([first]), max_new_tokens=3, do_sample=False, **kw)
    tps: dict[tuple[str, str], list[list[float]]] = {}
    stats: dict[tuple[str, str], list] = {}
    same: dict[tuple[str, str], list[bool]] = {}
    firsts: dict[tuple[str, int, int], dict[str, float]] = {}  # (workload, round, prompt) -> seconds
    for r in range(args.rounds):
        for w, ps in prompts.items():
            for i, ids in enumerate(ps):
                firsts[(w, r, i)] = first_token(ids)
                plain_tokens = None
                for name, fn in {**methods, **hf_methods}.items():
                    res = fn(ids)
                    if name.startswith("ours"):
                        speed, toks = res.tokens_per_second, res.sequences[0].token_ids
                        if getattr(res, "stats", None) is not None:
                            stats.setdefault((w, name), []).append(res.stats)
                    else:
                        speed, toks = res
                    if name == "ours plain":
                        plain_tokens = toks
                    same.setdefault((w, name), []).append(toks == plain_tokens)
                    tps.setdefault((w, name), []).append([speed, r, i])
                    print(f"round {r} {w} #{i} {name}: {speed:.1f} tok/s", file=sys.stderr)

    def ratio(w: str, num: str, den: str) -> float:
        """Median over (round, prompt) of tokens/s of ``num`` / ``den`` in the same round."""
        den_by = {(r, i): s for s, r, i in tps[(w, den)]}
        return statistics.median(s / den_by[(r, i)] for s, r, i in tps[(w, num)])

    def decode_ratio(w: str, num: str, den: str) -> float:
        """The same for the decoding after the first token: ``(T_den - T_first) / (T_num - T_first)``."""
        side = "ours" if num.startswith("ours") else "hf"
        den_by = {(r, i): s for s, r, i in tps[(w, den)]}
        vals = []
        for s, r, i in tps[(w, num)]:
            t_first = firsts[(w, r, i)][side]
            t_num, t_den = args.new / s, args.new / den_by[(r, i)]
            vals.append((t_den - t_first) / max(t_num - t_first, 1e-9))
        return statistics.median(vals)

    rows = []
    for w in prompts:
        for name in [*methods, *hf_methods]:
            st = stats.get((w, name))
            base = "ours plain" if name.startswith("ours") else "hf plain"
            rows.append({
                "workload": w, "method": name,
                "tokens/s (median)": statistics.median(s for s, _, _ in tps[(w, name)]),
                "speed-up vs own plain": ratio(w, name, base),
                "decode speed-up (first token excluded)": decode_ratio(w, name, base),
                "acceptance": (sum(s.accepted for s in st) / max(1, sum(s.drafted for s in st))) if st else "",
                "tokens/forward": (sum(s.generated for s in st) / sum(s.target_forwards for s in st)) if st else "",
                "steps without a draft": (f"{sum(s.plain_steps for s in st)}/{sum(s.target_forwards - 1 for s in st)}"
                                          if st else ""),
                "same tokens as ours plain": f"{sum(same[(w, name)])}/{len(same[(w, name)])}",
            })
    table = md_table(rows)
    def first_of(w: str, side: str) -> float:
        return statistics.median(f[side] for k, f in firsts.items() if k[0] == w)

    first = "; ".join(w + ": " + ", ".join(f"{side} {first_of(w, side):.2f} s" for side in firsts[(w, 0, 0)])
                      for w in prompts)
    notes = (f"Greedy, {args.new} new tokens forced, {args.prompts} prompts per workload x {args.rounds} rounds, "
             f"interleaved, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at the end. "
             f"First token alone (the prompt's forward; medians): {first}. "
             f"Ours: --draft-tokens {lookup.draft_tokens} (lookup: the most per round, the length chosen by "
             f"expected tokens per verification cost), --lookup-ngram "
             f"{args.lookup_ngram}; transformers: prompt_lookup_num_tokens={args.hf_lookup_tokens} and its "
             f"default assistant settings. Draft model ({args.model_draft_tokens} drafted per round): the default "
             f"model's first {args.draft_layers} of "
             f"{model.config.num_hidden_layers} layers (shared tensors). 'same tokens' compares with our plain "
             "greedy (transformers' own plain greedy may differ by a float tie).")
    write_result("speculative", "Speculative decoding: prompt lookup and a draft model vs transformers", table, notes)


if __name__ == "__main__":
    main()
