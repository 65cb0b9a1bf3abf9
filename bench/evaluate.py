"""Benchmark: ``llmcourse eval bench`` against lm-evaluation-harness 0.4.13's ``hf`` backend, same examples,
same local data, same model folder, same run.

lm-eval lives in its own virtual environment, ``bench/venvs/lmeval`` (git-ignored), made by ``--setup``:
``torch==2.13.0`` (the CPU build) first, then ``lm_eval[hf]==0.4.13`` with our transformers pin. It is never a
dependency of the package.

What it does:

1. draws the seeded sample of each task with ``llmcourse.evaluation.build`` (``--limit`` per task, ``--mmlu-limit``
   per MMLU subject) and writes those documents, in lm-eval's raw Hugging Face schema, as JSONL files;
2. writes one task YAML per task that ``include``\\ s lm-eval's own YAML (``lm_eval/tasks/...``) and only points
   ``dataset_path: json`` at those files (so the prompts, ``process_docs``, choices and metrics are lm-eval's);
3. scores them with lm-eval's ``hf`` backend (``bench/lmeval_driver.py`` in the venv) at each
   ``--lm-eval-batch-sizes`` (a finished run is cached under ``--lm-eval-cache``, keyed by the sample, and read back
   by later runs: ``--only-lm-eval`` makes just that side), then with each of our scorers (``--ours packed,cached``:
   the packed trees, and one question per forward through the K/V cache) in this process; optionally
   (``--backend``) with our backend under lm-eval;
4. compares per-example log-likelihoods (max abs difference, tolerance 1e-4), acc / acc_norm per example and per
   task, and examples/s of the scoring (tokenisation + forwards; model loading and data reading excluded).

Run: ``.venv/bin/python bench/evaluate.py --setup`` once (minutes), then
``.venv/bin/python bench/evaluate.py --limit 200 --mmlu-limit 40`` (writes bench/results/evaluate.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / "venvs" / "lmeval"
PY = VENV / "bin" / "python"
PINS = ["lm_eval[hf]==0.4.13", "transformers==5.24.0", "tokenizers==0.23.3", "safetensors==0.8.0",
        "accelerate==1.15.0", "gguf==0.19.0"]  # gguf: our backend (--backend) imports llmcourse there
TOL = 1e-4

# our task -> (lm-eval YAML under lm_eval/tasks, the raw columns lm-eval reads, the splits its YAML names)
LM_EVAL_YAML = {
    "hellaswag": ("hellaswag/hellaswag.yaml", ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
                                               "source_id", "split", "split_type", "label"), ("validation", "train")),
    "arc_easy": ("arc/arc_easy.yaml", None, ("test", "validation", "train")),
    "arc_challenge": ("arc/arc_challenge.yaml", None, ("test", "validation", "train")),
    "piqa": ("piqa/piqa.yaml", ("goal", "sol1", "sol2", "label"), ("validation", "train")),
    "winogrande": ("winogrande/default.yaml", ("sentence", "option1", "option2", "answer"), ("validation", "train")),
}


def setup() -> None:
    """Create bench/venvs/lmeval: CPU torch first, then lm-eval 0.4.13 with its hf extra."""
    sys.path.insert(0, str(HERE))
    from common import anchor_venv

    pip = anchor_venv(VENV)
    subprocess.run([*pip, *PINS], check=True)


def lm_eval_tasks_dir() -> Path:
    out = subprocess.run([str(PY), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out) / "tasks"


def raw_docs(data: Any) -> list[dict[str, Any]]:
    """The selected documents of ``data`` in the Hugging Face schema lm-eval's YAML reads."""
    from llmcourse.evaluation import read_arrow
    from llmcourse.evaluation.data import data_root

    name = data.task.name
    if name.startswith("arc_"):  # our test documents: question, choices (text), gold
        return [{"id": d["id"], "question": d["question"],
                 "choices": {"text": d["choices"], "label": [chr(65 + i) for i in range(len(d["choices"]))]},
                 "answerKey": chr(65 + d["gold"])} for d in data.docs]
    if data.task.group == "mmlu":
        return data.docs  # question, choices, answer (already the raw schema)
    cols = LM_EVAL_YAML[name][1]
    rows = read_arrow(data_root() / data.task.source, cols)
    return [rows[ex.doc_id] for ex in data.examples]


def write_local_tasks(datas: list[Any], where: Path, tasks_dir: Path, limit_mmlu_dev: int = 5) -> list[str]:
    """JSONL files + YAMLs that include lm-eval's task definitions; returns the local task names."""
    from llmcourse.evaluation.data import data_root
    from llmcourse.evaluation.tasks import _mmlu_split

    names = []
    for d in datas:
        name = d.task.name
        rows = raw_docs(d)
        f = where / f"{name}.jsonl"
        f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if d.task.group == "mmlu":
            subject = name[len("mmlu_"):]
            yaml_path = tasks_dir / "mmlu" / "default" / f"mmlu_{subject}.yaml"
            dev = where / f"{name}.dev.jsonl"
            dev.write_text("".join(json.dumps(r) + "\n" for r in _mmlu_split(subject, "dev")()[:limit_mmlu_dev]))
            files = {"test": str(f), "dev": str(dev)}
        else:
            yaml_path = tasks_dir / LM_EVAL_YAML[name][0]
            files = {s: str(f) for s in LM_EVAL_YAML[name][2]}  # 0-shot: the train split is never read
        local = f"local_{name}"
        (where / f"{local}.yaml").write_text(
            f"include: {yaml_path}\ntask: {local}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n" + "".join(f"    {k}: {v}\n" for k, v in files.items()))
        names.append(local)
    assert data_root()
    return names


OURS = {  # label -> Scorer options
    "packed": {"packed": True},  # the default: questions as trees, many per forward, the head on read rows only
    "cached": {"packed": False},  # one question per forward: prefix K/V cache, then its choices as one batch
}


def run_ours(datas: list[Any], threads: int, modes: list[str], max_tokens: int) -> dict[str, dict[str, Any]]:
    """Each of our scorers (``OURS``) on every task: records, results, wall and CPU seconds (the model is
    loaded once)."""
    import torch

    from llmcourse.core.models import load_model
    from llmcourse.evaluation import Scorer, score_task

    torch.set_num_threads(threads)
    lm = load_model("default")
    outs = {}
    for mode in modes:
        scorer = Scorer(lm.model, lm.tokenizer, max_tokens=max_tokens, **OURS[mode])
        out: dict[str, Any] = {"tasks": {}, "seconds": 0.0, "cpu_seconds": 0.0, "task_cpu": {}}
        for d in datas:
            c0 = time.process_time()
            recs, res = score_task(scorer, d)
            out["tasks"][d.task.name] = {"records": recs, "result": res}
            out["seconds"] += res.seconds
            out["task_cpu"][d.task.name] = time.process_time() - c0
            out["cpu_seconds"] += out["task_cpu"][d.task.name]
        if mode == "packed":
            out["work"] = token_counts(scorer, datas, max_tokens)
        print(f"  ours ({mode}): {out['seconds']:.1f} s, {out['cpu_seconds']:.1f} CPU s", flush=True)
        outs[mode] = out
    return outs


def token_counts(scorer: Any, datas: list[Any], max_tokens: int) -> list[dict[str, Any]]:
    """Per task, the work each side does: tokens through the model body and rows through the LM head. lm-eval:
    every request's input ``(ctx + cont)[-(L+1):][:-1]`` at every position (requests of one context and a
    one-token continuation counted once, as its cache does; its batch padding not counted); ours: the packed
    batches, padding included, and the head on the read rows only."""
    from llmcourse.evaluation.packing import batches, build_tree

    out = []
    for d in datas:
        body = head = 0
        seen: set[tuple[int, ...]] = set()
        trees = []
        for ex in d.examples:
            enc = scorer.encode(ex.requests)
            for c, t in enc:
                inp = tuple((c + t)[-(scorer.max_length + 1):][:-1])
                if len(t) == 1 and inp in seen:
                    continue
                seen.add(inp)
                body += len(inp)
            trees.append(build_tree(enc, scorer.max_length))
        lengths = [len(t.tokens) for t in trees]
        ours_body = sum(len(b) * lengths[b[0][0]] for b in batches(lengths, max_tokens))  # rows x width
        ours_head = sum(len(r) for t in trees for r in t.reads)
        head = body
        out.append({"task": d.task.name, "lm-eval body tokens": body, "ours body tokens (padded)": ours_body,
                    "lm-eval head rows": head, "ours head rows": ours_head, "body ratio": body / ours_body})
    return out


def run_lm_eval(names: list[str], include: Path, batch_size: int, threads: int, model: str = "hf",
                cache: Path | None = None) -> dict[str, Any]:
    """lm-eval's run at one batch size; with ``cache`` (a JSON file) a finished run is read back instead of
    repeated (the same documents: the file name carries the sample's key), and a new one is saved there."""
    from llmcourse.core.models import default_model_dir

    if cache is not None and cache.exists():
        return json.loads(cache.read_text())

    cfg = {"model_dir": str(default_model_dir()), "include": str(include), "tasks": names,
           "batch_size": batch_size, "threads": threads, "model": model}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cfg.json").write_text(json.dumps(cfg))
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        if model == "llmcourse":
            env["PYTHONPATH"] = str(ROOT / "src")
        t0 = time.perf_counter()
        p = subprocess.run([str(PY), str(HERE / "lmeval_driver.py"), str(Path(tmp) / "cfg.json"),
                            str(Path(tmp) / "out.json")], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"lm-eval failed ({p.returncode}):\n{p.stderr[-4000:]}")
        res = json.loads((Path(tmp) / "out.json").read_text())
        res["process_seconds"] = time.perf_counter() - t0
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cache.with_suffix(".tmp")
        tmp_file.write_text(json.dumps(res))
        tmp_file.replace(cache)
    return res


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: examples, max |ll difference|, acc / acc_norm equal per example, both scores."""
    rows = []
    for name, o in ours["tasks"].items():
        t = theirs["samples"][f"local_{name}"]
        recs = o["records"]
        assert len(t) == len(recs), (name, len(t), len(recs))
        diff = max(abs(a - b) for r, s in zip(recs, t, strict=True) for a, b in zip(r["lls"], s["lls"], strict=True))
        same_acc = sum(r["acc"] == s["acc"] for r, s in zip(recs, t, strict=True))
        same_norm = sum(r["acc_norm"] == s["acc_norm"] for r, s in zip(recs, t, strict=True) if s["acc_norm"] is not None)
        res = theirs["results"][f"local_{name}"]
        m = o["result"].metrics
        rows.append({"task": name, "n": len(recs), "max |Δll|": diff,
                     "acc ours": m["acc"], "acc lm-eval": res["acc,none"],
                     "acc_norm ours": m.get("acc_norm", "-"), "acc_norm lm-eval": res.get("acc_norm,none", "-"),
                     "same acc": f"{same_acc}/{len(recs)}",
                     "same acc_norm": f"{same_norm}/{len(recs)}" if "acc_norm" in m else "-",
                     "stderr ours": o["result"].stderr["acc"], "stderr lm-eval": res["acc_stderr,none"]})
    return rows


def leaderboard_report(cache: Path, models: list[str]) -> str:
    """Markdown tables of an ``eval leaderboard --cache`` folder (finished parts only; no model is loaded):
    each model's measurements and scores, then each score's difference from the first model's *on the same
    questions* with the paired standard error ``sd(x_i - y_i) / sqrt(n)`` and the number of questions whose
    answer changed (a paired comparison resolves much smaller differences than the two scores' own errors)."""
    sys.path.insert(0, str(HERE))
    from common import md_table

    parts: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in cache.iterdir() if (p / "model.json").exists()):
        spec = json.loads((folder / "model.json").read_text())["spec"]
        newest = sorted(folder.glob("measures-*.json"), key=lambda f: f.stat().st_mtime)
        tasks: dict[str, Any] = {}
        for f in sorted(folder.glob("task-*.json"), key=lambda f: f.stat().st_mtime):
            t = json.loads(f.read_text())
            tasks[t["result"]["task"]] = t
        parts[spec] = {"m": json.loads(newest[-1].read_text()) if newest else {}, "tasks": tasks}
    models = [m for m in models if m in parts]
    names = [t for t in ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
             if any(t in parts[m]["tasks"] for m in models)]

    def pct(r: dict[str, Any], metric: str) -> str:
        v, se = r["metrics"].get(metric), r["stderr"].get(metric)
        return "-" if v is None else f"{100 * v:.1f} ± {100 * se:.1f}"

    rows = []
    for m in models:
        me, ts = parts[m]["m"], parts[m]["tasks"]
        row: dict[str, Any] = {"model": m, "MB": f"{me['bytes'] / 1e6:.1f}" if me.get("bytes") else "-",
                               "ppl": f"{me['perplexity']:.3f}" if "perplexity" in me else "-",
                               "KL": f"{me['kl']:.4f}" if "kl" in me else "-",
                               "top-1": f"{100 * me['top1']:.1f}%" if "top1" in me else "-"}
        n = secs = 0.0
        for t in names:
            r = ts.get(t, {}).get("result")
            row[f"{t} n"] = r["n"] if r else "-"
            row[f"{t} acc"] = pct(r, "acc") if r else "-"
            row[f"{t} acc_norm"] = pct(r, "acc_norm") if r else "-"
            if r:
                n, secs = n + r["n"], secs + r["seconds"]
        row["scoring ex/s"] = f"{n / secs:.2f}" if secs else "-"
        row["decode tok/s"] = f"{me['decode tok/s']:.1f}" if me.get("decode tok/s") else "-"
        rows.append(row)
    diffs = []
    ref = parts[models[0]]["tasks"] if models else {}
    for m in models[1:]:
        for t in names:
            if t not in ref or t not in parts[m]["tasks"]:
                continue
            a = {e["doc_id"]: e for e in ref[t]["examples"]}
            b = {e["doc_id"]: e for e in parts[m]["tasks"][t]["examples"]}
            ids = sorted(set(a) & set(b))
            row = {"model": m, "task": t, "n": len(ids)}
            for metric in ("acc", "acc_norm"):
                if metric not in a[ids[0]]:
                    continue
                d = [b[i][metric] - a[i][metric] for i in ids]
                mu = sum(d) / len(d)
                se = (sum((x - mu) ** 2 for x in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5
                row[f"Δ{metric} (pp)"] = f"{100 * mu:+.1f} ± {100 * se:.1f}"
                row[f"{metric} changed"] = sum(x != 0 for x in d)
            diffs.append(row)
    return md_table(rows) + ("\n\n" + md_table(diffs) if diffs else "")



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create lm-eval's venv and exit")
    ap.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu5")
    ap.add_argument("--limit", type=int, default=200, help="documents per task (seeded sample)")
    ap.add_argument("--mmlu-limit", type=int, default=40, help="documents per MMLU subject")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1: robust on a shared machine)")
    ap.add_argument("--lm-eval-batch-sizes", default="1,8")
    ap.add_argument("--lm-eval-cache", default=str(HERE / "results" / "lmeval_cache"),
                    help="folder of finished lm-eval runs (per batch size and sample), read back instead of rerun; "
                         "'' to always rerun")
    ap.add_argument("--only-lm-eval", action="store_true", help="run (and cache) lm-eval's side only, then exit")
    ap.add_argument("--ours", default="packed,cached", help=f"our scorers to time, the first one compared in "
                    f"full: {', '.join(OURS)}")
    ap.add_argument("--batch-size", type=int, default=1024, help="our packed forward's size in tokens")
    ap.add_argument("--backend", action="store_true", help="also run our lm-eval backend under lm-eval")
    ap.add_argument("--save", default=str(HERE / "results" / "evaluate.json"), help="raw figures (JSON)")
    ap.add_argument("--name", default="evaluate", help="result section: bench/results/NAME.md")
    ap.add_argument("--leaderboard-report", metavar="CACHE", default=None,
                    help="print markdown tables of an `eval leaderboard --cache CACHE` folder (the models of "
                    "--models, in that order; paired differences against the first) and exit")
    ap.add_argument("--models", default="default", help="with --leaderboard-report: the models' specs, in order")
    args = ap.parse_args()
    if args.leaderboard_report:
        print(leaderboard_report(Path(args.leaderboard_report), args.models.split(",")))
        return 0
    if args.setup:
        setup()
        return 0
    if not PY.exists():
        print(f"lm-eval's venv is missing: run `{sys.executable} bench/evaluate.py --setup` first", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "src"))
    from common import md_table, write_result

    from llmcourse.evaluation import build, resolve

    tasks, _ = resolve(args.tasks)
    datas = [build(t, args.mmlu_limit if t.group else args.limit, args.seed) for t in tasks]
    n = sum(len(d.examples) for d in datas)
    key = f"{'-'.join(t.name for t in tasks)}_l{args.limit}_m{args.mmlu_limit}_s{args.seed}_t{args.threads}"
    cache_dir = Path(args.lm_eval_cache) if args.lm_eval_cache else None
    with tempfile.TemporaryDirectory() as tmp:
        names = write_local_tasks(datas, Path(tmp), lm_eval_tasks_dir())
        runs = {}
        for bs in [int(b) for b in args.lm_eval_batch_sizes.split(",")]:
            print(f"lm-eval hf, batch {bs}...", flush=True)
            cache = cache_dir / f"hf_b{bs}_{key}.json" if cache_dir is not None else None
            runs[bs] = run_lm_eval(names, Path(tmp), bs, args.threads, cache=cache)
            print(f"  lm-eval batch {bs}: {runs[bs]['loglikelihood_seconds']:.1f} s in loglikelihood "
                  f"({runs[bs]['loglikelihood_cpu_seconds']:.1f} CPU s)", flush=True)
        if args.only_lm_eval:
            return 0
        print(f"{n} examples in {len(datas)} tasks; ours...", flush=True)
        modes = args.ours.split(",")
        outs = run_ours(datas, args.threads, modes, args.batch_size)
        ours = outs[modes[0]]
        backend = None
        if args.backend:
            print("our backend under lm-eval...", flush=True)
            backend = run_lm_eval(names, Path(tmp), 64, args.threads, model="llmcourse")
    b1 = min(runs)
    rows = compare(ours, runs[b1])
    agree = []  # every scorer of ours against every lm-eval run: the largest difference and acc agreement
    for mode, o in outs.items():
        for bs, r in runs.items():
            c = compare(o, r)
            agree.append({"ours": mode, "lm-eval batch": bs, "examples": sum(x["n"] for x in c),
                          "max |Δll|": max(x["max |Δll|"] for x in c),
                          "same acc": sum(int(x["same acc"].split("/")[0]) for x in c),
                          "same acc_norm": sum(int(x["same acc_norm"].split("/")[0]) for x in c
                                               if x["same acc_norm"] != "-")})
    for bs, r in runs.items():  # lm-eval against itself: the floating-point noise floor of batching
        if bs != b1:
            d = max(abs(a - b) for t in r["samples"] for x, y in zip(r["samples"][t], runs[b1]["samples"][t], strict=True)
                    for a, b in zip(x["lls"], y["lls"], strict=True))
            agree.append({"ours": f"(lm-eval batch {bs})", "lm-eval batch": b1, "examples": n, "max |Δll|": d,
                          "same acc": sum(x["acc"] == y["acc"] for t in r["samples"] for x, y in
                                          zip(r["samples"][t], runs[b1]["samples"][t], strict=True)),
                          "same acc_norm": "-"})
    base_cpu = runs[b1]["loglikelihood_cpu_seconds"]
    best = min(runs, key=lambda b: runs[b]["loglikelihood_cpu_seconds"])
    best_cpu = runs[best]["loglikelihood_cpu_seconds"]
    speed = []
    for mode, o in outs.items():
        speed.append({"scorer": f"ours, {mode}" + (f" (--batch-size {args.batch_size} tokens)" if mode == "packed"
                                                   else ""),
                      "wall s": o["seconds"], "examples/s (wall)": n / o["seconds"], "CPU s": o["cpu_seconds"],
                      "examples per CPU-s": n / o["cpu_seconds"],
                      f"speed-up (CPU) vs lm-eval batch {b1}": base_cpu / o["cpu_seconds"],
                      f"vs lm-eval batch {best}": best_cpu / o["cpu_seconds"]})
    for bs, r in runs.items():
        speed.append({"scorer": f"lm-eval 0.4.13 hf, batch {bs}", "wall s": r["loglikelihood_seconds"],
                      "examples/s (wall)": n / r["loglikelihood_seconds"], "CPU s": r["loglikelihood_cpu_seconds"],
                      "examples per CPU-s": n / r["loglikelihood_cpu_seconds"],
                      f"speed-up (CPU) vs lm-eval batch {b1}": base_cpu / r["loglikelihood_cpu_seconds"],
                      f"vs lm-eval batch {best}": best_cpu / r["loglikelihood_cpu_seconds"]})
    work = {w["task"]: w for w in outs.get("packed", {}).get("work", [])}
    per_task = [{"task": name, **{f"{mode} CPU s": o["task_cpu"][name] for mode, o in outs.items()},
                 **{k: v for k, v in work.get(name, {}).items() if k != "task"}} for name in ours["task_cpu"]]
    notes = [f"Seeded samples (seed {args.seed}): {args.limit} documents per task, {args.mmlu_limit} per MMLU "
             f"subject; the same documents, written as JSONL, are read by lm-eval through YAMLs that include its "
             f"own task files. {args.threads} torch thread(s) for both. Times are the scoring only (tokenisation "
             f"and forwards: lm-eval's `loglikelihood`), not model loading; on this shared 2-core machine the wall "
             f"time depends on the other processes, so the ratio is taken on CPU time (one thread each). Ours "
             f"({modes[0]}) is {best_cpu / ours['cpu_seconds']:.2f}x lm-eval at its best batch size ({best}) and "
             f"{base_cpu / ours['cpu_seconds']:.2f}x at batch {b1} (CPU time; wall: "
             f"{runs[b1]['loglikelihood_seconds'] / ours['seconds']:.2f}x at batch {b1})."]
    if backend is not None:
        brow = compare(ours, backend)
        notes.append("Our backend under lm-eval's evaluator (`--model llmcourse`): max |Δll| vs ours "
                     f"{max(r['max |Δll|'] for r in brow):.2e}, acc identical on "
                     f"{sum(int(r['same acc'].split('/')[0]) for r in brow)}/{n} examples, "
                     f"{n / backend['loglikelihood_seconds']:.2f} examples/s.")
    table = "\n\n".join(md_table(t) for t in (rows, agree, speed, per_task))
    write_result(args.name, "Evaluation: ours vs lm-evaluation-harness 0.4.13 hf (bench/evaluate.py)", table,
                 "\n\n".join(notes))
    save = Path(args.save)
    save.parent.mkdir(parents=True, exist_ok=True)
    save.write_text(json.dumps({"compare": rows, "agree": agree, "speed": speed, "per_task": per_task, "notes": notes,
                                "backend": None if backend is None else compare(ours, backend)}, indent=2,
                               default=str))
    bad = [f"{r['ours']} vs batch {r['lm-eval batch']}" for r in agree
           if r["ours"] in OURS and (r["max |Δll|"] > TOL or r["same acc"] != r["examples"])]
    if bad:
        print(f"MISMATCH beyond {TOL} or in acc: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
