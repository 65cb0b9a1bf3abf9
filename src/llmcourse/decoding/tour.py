"""Tour section of the decoding lab: the notebook's "I have a dream" experiment on the default model.

Greedy search, real beam search, the notebook's full-tree "beam search", top-k and nucleus
sampling trees, per-step probability bars and the temperature demo, plus a check that our
greedy and beam tokens equal transformers' ``generate()`` and a short speed comparison.
"""

from __future__ import annotations

import html
import time
from typing import Any

import torch

from llmcourse.core.report import TourContext, TourSection, html_table
from llmcourse.decoding import GenerationConfig, generate
from llmcourse.decoding import tree as tree_mod

PROMPT = "I have a dream"
# an input-grounded request (the answer copies spans of the text: what prompt lookup drafts from)
GROUNDED = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889 as the "
            "centerpiece of the 1889 World's Fair. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), "
            "it was initially criticised by some of France's leading artists and intellectuals for its design, but "
            "it has become a global cultural icon of France and one of the most recognisable structures in the "
            "world. The tower is 330 metres tall, about the same height as an 81-storey building, and it was the "
            "tallest man-made structure in the world for 41 years, until the Chrysler Building in New York City "
            "was finished in 1930.\n\nSummarise the text above in a few sentences.")


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{name}" alt="{html.escape(alt)}"></p>'


def section(ctx: TourContext) -> TourSection:
    """Run the experiment; write the plots into ``ctx.out_dir``."""
    lm = ctx.lm
    model, tok = lm.model, lm.tokenizer
    n_new = 2 if ctx.quick else 5
    depth = 2 if ctx.quick else 5
    out_dir = ctx.out_dir
    rows: list[dict[str, Any]] = []
    parts: list[str] = [f"<p>Prompt <b>{html.escape(PROMPT)!r}</b>, {n_new} new tokens, as in the course's "
                        "notebook 1 (which used GPT-2; here SmolLM2-135M-Instruct).</p>"]

    # greedy: our engine, with the per-step distributions recorded
    prompt_ids = tok(PROMPT).input_ids
    greedy = generate(model, tok, PROMPT, GenerationConfig(max_new_tokens=n_new), record=True)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, do_sample=False)[0, len(prompt_ids):]
    same_greedy = ref.tolist() == greedy.sequences[0].token_ids
    tree_mod.draw_tree(tree_mod.tree_from_records(tok, PROMPT, greedy.records[0]), out_dir / "decoding_greedy.png",
                       "greedy search (chosen path, 2 best alternatives per step)")
    tree_mod.draw_step_bars(greedy.records[0], tok, out_dir / "decoding_greedy_bars.png", "greedy: per-step top tokens")
    rows.append({"strategy": "greedy (ours)", "text": PROMPT + greedy.sequences[0].text,
                 "score": greedy.sequences[0].score, "same as generate()": same_greedy})

    # real beam search, recorded
    beam = generate(model, tok, PROMPT, GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=n_new,
                                                         num_return_sequences=2), record=True)
    with torch.inference_mode():
        bref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, num_beams=2, do_sample=False,
                              num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    n_ref = int((bref.beam_indices[0] != -1).sum())
    same_beam = bref.sequences[0, len(prompt_ids):len(prompt_ids) + n_ref].tolist() == beam.sequences[0].token_ids
    tree_mod.draw_tree(tree_mod.tree_from_beam(tok, PROMPT, beam.beam), out_dir / "decoding_beam.png",
                       "beam search, 2 beams (thick: finished, dashed: pruned)")
    for i, s in enumerate(beam.sequences):
        rows.append({"strategy": f"beam-2 #{i + 1} (ours)", "text": PROMPT + s.text, "score": s.score,
                     "same as generate()": same_beam if i == 0 else ""})

    # the notebook's expansions
    full = tree_mod.expand_tree(model, tok, PROMPT, depth=depth, branches=2, mode="beam")
    tree_mod.draw_tree(full, out_dir / "decoding_fulltree.png", "the notebook's full-tree 'beam search' (2 x depth)")
    rows.append({"strategy": "full tree (notebook)", "text": PROMPT + tree_mod.best_path_text(full),
                 "score": max(n.value for n in full.nodes if n.status == "best"), "same as generate()": "n/a"})
    for mode, kw, name in (("top-k", {"top_k": 20}, "topk"), ("nucleus", {"top_p": 0.5}, "nucleus")):
        t = tree_mod.expand_tree(model, tok, PROMPT, depth=depth, branches=2, mode=mode, temperature=1.0, seed=0, **kw)
        tree_mod.draw_tree(t, out_dir / f"decoding_{name}.png", f"{mode} sampling, 2 samples per node")
    sample_kw = dict(strategy="sample", max_new_tokens=n_new, seed=0)
    topk = generate(model, tok, PROMPT, GenerationConfig(top_k=20, **sample_kw), record=True)
    nucleus = generate(model, tok, PROMPT, GenerationConfig(top_p=0.5, **sample_kw), record=True)
    tree_mod.draw_step_bars(topk.records[0], tok, out_dir / "decoding_topk_bars.png", "top-k (k=20): cut-off dotted")
    tree_mod.draw_step_bars(nucleus.records[0], tok, out_dir / "decoding_nucleus_bars.png",
                            "nucleus (p=0.5): cut-off dotted")
    rows.append({"strategy": "top-k 20 (seed 0)", "text": PROMPT + topk.sequences[0].text,
                 "score": topk.sequences[0].score, "same as generate()": ""})
    rows.append({"strategy": "nucleus 0.5 (seed 0)", "text": PROMPT + nucleus.sequences[0].text,
                 "score": nucleus.sequences[0].score, "same as generate()": ""})
    temps = tree_mod.draw_temperature(out_dir / "decoding_temperature.png")

    # a short speed check: ours vs generate(), greedy, same tokens
    n_speed = 4 if ctx.quick else 64  # 64: long enough for the compiled step (docs/decoding.md)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_speed, min_new_tokens=n_speed, do_sample=False)
    hf_tps = n_speed / (time.perf_counter() - t0)
    ours = generate(model, tok, PROMPT, GenerationConfig(max_new_tokens=n_speed, eos_token_ids=()))
    speed = [{"decoder": "transformers generate()", "tokens/s": hf_tps},
             {"decoder": f"llmcourse ({ours.backend} backend)", "tokens/s": ours.tokens_per_second}]
    spec_rows, spec_summary = _speculative(model, tok, out_dir, n_new=32 if ctx.quick else 128)

    parts += [
        html_table(rows, ["strategy", "text", "score", "same as generate()"]),
        "<p>Scores: greedy and sampling give the log-likelihood of the new tokens; beam search gives "
        "transformers' length-normalised score; the full tree gives the notebook's score "
        "(sum of log-probabilities / all tokens including the prompt).</p>",
        "<h3>Greedy search</h3>", _img("decoding_greedy.png", "greedy tree"),
        _img("decoding_greedy_bars.png", "greedy bars"),
        "<h3>Beam search (real, pruned)</h3>", _img("decoding_beam.png", "beam tree"),
        "<h3>The notebook's full tree</h3><p>Every node expands its 2 most likely tokens: this is exhaustive "
        "search of a small tree, not beam search (which keeps only K hypotheses per step).</p>",
        _img("decoding_fulltree.png", "full tree"),
        "<h3>Top-k and nucleus sampling</h3>", _img("decoding_topk.png", "top-k tree"),
        _img("decoding_topk_bars.png", "top-k bars"), _img("decoding_nucleus.png", "nucleus tree"),
        _img("decoding_nucleus_bars.png", "nucleus bars"),
        "<h3>Temperature</h3>", _img("decoding_temperature.png", "temperature demo"),
        html_table([{"T": t, **{f"p{i}": p for i, p in enumerate(ps)}} for t, ps in temps.items()]),
        f"<h3>Speed (greedy, {n_speed} tokens, this machine)</h3>", html_table(speed),
        "<h3>Speculative decoding: prompt lookup</h3><p>A request to summarise a paragraph given in the prompt "
        "(chat template): the draft is what followed the text's last tokens (its longest n-gram, 3 down to 1) earlier in the prompt or the "
        "answer, and the model checks all drafted tokens in one forward. The tokens are those of plain greedy "
        f"decoding; {spec_summary['lookup_new_tokens']} new tokens.</p>", html_table(spec_rows),
        _img("decoding_speculative.png", "speculative rounds"),
    ]
    summary = {"greedy_text": greedy.sequences[0].text, "greedy_same_as_hf": same_greedy,
               "beam_text": beam.sequences[0].text, "beam_same_as_hf": same_beam,
               "fulltree_best": tree_mod.best_path_text(full), "hf_tokens_per_second": hf_tps,
               "ours_tokens_per_second": ours.tokens_per_second, **spec_summary}
    return TourSection("Decoding strategies", "\n".join(parts), summary)


def _speculative(model: Any, tok: Any, out_dir: Any, n_new: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Plain greedy vs prompt lookup on :data:`GROUNDED`: tokens/s, acceptance, tokens per forward, and the
    strip of the lookup's rounds (``decoding_speculative.png``)."""
    from llmcourse.decoding import SpeculativeConfig, chat_prompt_ids, draw_strip, speculative_generate

    ids = chat_prompt_ids(tok, [{"role": "user", "content": GROUNDED}])
    cfg = GenerationConfig(max_new_tokens=n_new)
    plain = generate(model, tok, ids, cfg)
    spec = SpeculativeConfig("lookup")
    look = speculative_generate(model, tok, ids, cfg, spec, record=True)
    st = look.stats
    draw_strip(look.rounds[0], tok, out_dir / "decoding_speculative.png",
               title=f"prompt lookup, up to {spec.draft_tokens} drafted per forward: {st.generated} tokens in "
               f"{st.target_forwards} forwards")
    same = plain.sequences[0].token_ids == look.sequences[0].token_ids
    rows = [{"decoder": "plain greedy", "tokens/s": plain.tokens_per_second, "tokens per forward": 1.0,
             "acceptance": "", "same tokens": ""},
            {"decoder": f"prompt lookup (--draft-tokens {spec.draft_tokens}, --lookup-ngram {spec.lookup_ngram})",
             "tokens/s": look.tokens_per_second, "tokens per forward": st.tokens_per_target_forward,
             "acceptance": st.acceptance_rate, "same tokens": same}]
    summary = {"lookup_same_as_greedy": same, "lookup_new_tokens": st.generated,
               "lookup_tokens_per_second": look.tokens_per_second, "lookup_plain_tokens_per_second":
               plain.tokens_per_second, "lookup_acceptance": st.acceptance_rate,
               "lookup_tokens_per_forward": st.tokens_per_target_forward}
    return rows, summary
