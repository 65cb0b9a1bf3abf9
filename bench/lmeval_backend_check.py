"""Our lm-eval backend under lm-eval 0.4.13's own CLI, against its ``hf`` backend under the same CLI.

Three local tasks cover the three request types: ARC-Easy test documents (``loglikelihood``, lm-eval's own
``arc_easy.yaml`` included), Wikipedia extracts (``loglikelihood_rolling``: word/byte perplexity, bits per byte)
and short questions (``generate_until``, greedy, until ``"\\n"``). Both runs go through
``python -m llmcourse.evaluation.lm_eval_cli run ...`` (lm-eval's ``cli_evaluate`` with ``llmcourse`` registered).

Run (after ``bench/evaluate.py --setup``): ``.venv/bin/python bench/lmeval_backend_check.py [--limit 20]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = HERE / "venvs" / "lmeval" / "bin" / "python"

QUESTIONS = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
             ("What colour is the sky on a clear day?", "Blue"), ("What is two plus two?", "Four"),
             ("Which planet is closest to the Sun?", "Mercury")]


def run_cli(model: str, model_args: str, include: Path, out: Path, limit: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(PY), "-m", "llmcourse.evaluation.lm_eval_cli", "run", "--model", model, "--model_args", model_args,
           "--tasks", "local_arc_easy", "local_wiki_rolling", "local_gen", "--include_path", str(include),
           "--limit", str(limit), "--log_samples", "--output_path", str(out), "--batch_size", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} failed:\n{p.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return {"results": results, "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(HERE))
    from evaluate import lm_eval_tasks_dir

    from llmcourse.core.data import load_texts
    from llmcourse.core.models import default_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        from llmcourse.evaluation import TASKS, build

        d = build(TASKS["arc_easy"], limit=args.limit, seed=1234)
        arc = t / "arc.jsonl"
        arc.write_text("".join(json.dumps({"id": x["id"], "question": x["question"], "choices": {
            "text": x["choices"], "label": [chr(65 + i) for i in range(len(x["choices"]))]},
            "answerKey": chr(65 + x["gold"])}) + "\n" for x in d.docs))
        (t / "local_arc_easy.yaml").write_text(
            f"include: {lm_eval_tasks_dir() / 'arc' / 'arc_easy.yaml'}\ntask: local_arc_easy\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {arc}\n    validation: {arc}\n"
            f"    train: {arc}\n")
        wiki = t / "wiki.jsonl"
        wiki.write_text("".join(json.dumps({"text": x}) + "\n" for x in load_texts("default", "eval")[:args.limit]))
        (t / "local_wiki_rolling.yaml").write_text(
            f"task: local_wiki_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {wiki}\n"
            "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
        gen = t / "gen.jsonl"
        gen.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in QUESTIONS))
        (t / "local_gen.yaml").write_text(
            f"task: local_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gen}\n"
            "test_split: test\noutput_type: generate_until\ndoc_to_text: \"Question: {{q}}\\nAnswer:\"\n"
            "doc_to_target: ' {{a}}'\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n"
            "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
        model = default_model_dir()
        ours = run_cli("llmcourse", f"model={model}", t, t / "ours", args.limit)
        hf = run_cli("hf", f"pretrained={model},dtype=float32", t, t / "hf", args.limit)
    ok = True
    a = sorted(ours["samples"]["local_arc_easy"], key=lambda s: s["doc_id"])
    b = sorted(hf["samples"]["local_arc_easy"], key=lambda s: s["doc_id"])
    da = max(abs(float(x[0]) - float(y[0])) for s, r in zip(a, b, strict=True)
             for x, y in zip(s["filtered_resps"], r["filtered_resps"], strict=True))
    same = sum(s["acc"] == r["acc"] and s["acc_norm"] == r["acc_norm"] for s, r in zip(a, b, strict=True))
    print(f"loglikelihood (arc_easy, {len(a)} questions): max |Δll| {da:.2e}, acc/acc_norm equal on {same}/{len(a)}; "
          f"acc ours {ours['results']['local_arc_easy']['acc,none']:.4f} hf {hf['results']['local_arc_easy']['acc,none']:.4f}")
    ok &= da < 1e-4 and same == len(a)
    for m in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        x, y = ours["results"]["local_wiki_rolling"][m], hf["results"]["local_wiki_rolling"][m]
        print(f"loglikelihood_rolling {m}: ours {x:.6f} hf {y:.6f} (rel {abs(x - y) / y:.2e})")
        ok &= abs(x - y) / y < 1e-5
    ga = [s["filtered_resps"][0] for s in sorted(ours["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    gb = [s["filtered_resps"][0] for s in sorted(hf["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    print(f"generate_until: identical on {sum(x == y for x, y in zip(ga, gb, strict=True))}/{len(ga)}: {ga!r} vs {gb!r}")
    ok &= ga == gb
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
