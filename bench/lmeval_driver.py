"""Runs INSIDE bench/venvs/lmeval (lm_eval==0.4.13): its ``hf`` backend on the local task YAMLs that
bench/evaluate.py wrote, at one batch size; writes per-example log-likelihoods, metrics and timings as JSON.

Usage (bench/evaluate.py calls it): ``python lmeval_driver.py CONFIG.json OUT.json``
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    import torch

    torch.set_num_threads(cfg["threads"])
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if cfg.get("model") == "llmcourse":  # our backend, registered through lm-eval's registry
        from lm_eval.api.registry import get_model

        import llmcourse.evaluation.lm_eval_backend  # noqa: F401  (registers "llmcourse")

        lm = get_model("llmcourse")(model=cfg["model_dir"], batch_size=cfg["batch_size"])
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=cfg["model_dir"], dtype="float32", batch_size=cfg["batch_size"], device="cpu")
    spent = {"loglikelihood": 0.0, "cpu": 0.0}
    inner = lm.loglikelihood

    def timed(requests, *a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return inner(requests, *a, **kw)
        finally:
            spent["loglikelihood"] += time.perf_counter() - t0
            spent["cpu"] += time.process_time() - c0

    lm.loglikelihood = timed
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=cfg["tasks"], task_manager=TaskManager(include_path=cfg["include"]),
                          num_fewshot=0, log_samples=True, batch_size=cfg["batch_size"])
    wall = time.perf_counter() - t0
    out = {"batch_size": cfg["batch_size"], "loglikelihood_seconds": spent["loglikelihood"],
           "loglikelihood_cpu_seconds": spent["cpu"], "wall_seconds": wall,
           "results": res["results"], "samples": {}}
    for task, samples in res["samples"].items():
        rows = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            rows.append({"doc_id": s["doc_id"], "lls": [float(r[0]) for r in s["filtered_resps"]],
                         "is_greedy": [bool(r[1]) for r in s["filtered_resps"]],
                         "acc": s.get("acc"), "acc_norm": s.get("acc_norm"),
                         "arguments": [list(a) for a in s["arguments"]][:1]})
        out["samples"][task] = rows
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
