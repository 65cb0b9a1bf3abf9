"""Core benchmarks: cached load time of the default model, and perplexity throughput.

Anchors, in the same run: loading the same folder with plain ``AutoModelForCausalLM.from_pretrained``
+ ``AutoTokenizer``; the Hugging Face perplexity recipe on the same tokens and windows.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "core"))
from common import md_table, median_time, write_result  # noqa: E402
from hf_recipe import hf_recipe_perplexity  # noqa: E402

from llmcourse.core.data import load_text, tokenize_stream  # noqa: E402
from llmcourse.core.evaluate import perplexity  # noqa: E402
from llmcourse.core.models import default_model_dir, load_model  # noqa: E402

OURS = "from llmcourse.core.models import load_model as f; g = lambda: f('default')"
ANCHOR = ("from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
          "g = lambda: (M.from_pretrained('{path}'), T.from_pretrained('{path}'))")


def fresh_process_load(setup: str) -> float:
    """Seconds of the load call itself in a new interpreter (imports done before the clock starts)."""
    code = f"import time, torch, transformers; {setup}; t = time.perf_counter(); g(); print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = default_model_dir()  # converts once if needed: what follows are second loads
    ours = statistics.median(fresh_process_load(OURS) for _ in range(5))
    anchor = statistics.median(fresh_process_load(ANCHOR.format(path=path)) for _ in range(5))
    rows = [{"benchmark": "load default model (cached), fresh process, model + tokenizer",
             "ours": f"{ours:.2f} s", "anchor": f"{anchor:.2f} s",
             "ratio (anchor/ours)": anchor / ours, "target": "<= 3 s"}]

    lm = load_model("default")
    ids = tokenize_stream(lm.tokenizer, load_text("default", "eval"))[:, :2048]
    t_ours, _ = median_time(lambda: perplexity(lm.model, ids, 1024, 512), repeat=3, warmup=1)
    t_ref, _ = median_time(lambda: hf_recipe_perplexity(lm.model, ids, 1024, 512), repeat=3, warmup=0)
    r = perplexity(lm.model, ids, 1024, 512)
    ref_ppl = hf_recipe_perplexity(lm.model, ids, 1024, 512)
    n = r["tokens"]
    rows.append({"benchmark": f"perplexity, {n} tokens, window 1024 / stride 512",
                 "ours": f"{n / t_ours:.0f} tok/s", "anchor": f"{n / t_ref:.0f} tok/s",
                 "ratio (anchor/ours)": t_ref / t_ours,
                 "target": f"same value: {r['perplexity']:.5f} vs {ref_ppl:.5f}"})
    write_result("core", "Core: model load and perplexity (anchor: transformers)",
                 md_table(rows), "Anchor for perplexity: the Hugging Face recipe (tests/core/hf_recipe.py). "
                 f"Run: `.venv/bin/python bench/core.py` ({time.strftime('%H:%M')}).")


if __name__ == "__main__":
    main()
