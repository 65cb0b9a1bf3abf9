"""Benchmark of the GPTQ lab against GPTQModel 7.6.0 on the default model (SmolLM2-135M-Instruct).

For each calibration size (--calib, default ``32x256,128x512``) both quantizers get the *same*
token windows (``core.data.calibration_windows``, seed 0, calibration split) and the same settings
(4-bit, group 128, symmetric, damp 0.01, no act-order, true-sequential), once for each column order
of --orders (default ``gar,plain``): ``gar`` is group-aware reordering (GPTQModel's default when
act-order is off: ``act_group_aware=True``; ours ``--act-group-aware``), ``plain`` the paper's natural
order (``act_group_aware=False`` on both sides); each runs in its own process, whose wall time and
peak RSS are measured. Both folders are then evaluated by *our*
loader and core ``perplexity`` (window 512, stride 512, the first --ppl-tokens of the eval split),
so the figures differ only by the quantizer. Then:

* GPTQModel loads our folder (``backend=BACKEND.TORCH``) and its logits on 64 eval tokens are
  compared with ours (max |Δ| and top-1 agreement);
* greedy decode tokens/s of our 4-bit model vs our fp32 model (decoding lab's engine), and of
  GPTQModel's CPU backend on its own model.

GPTQModel lives in its own virtual environment (``bench/venvs/gptqmodel``, git-ignored), made by
``--setup`` as shared/MACHINE.md says: torch 2.13.0 (CPU), setuptools, wheel, then
``BUILD_CUDA_EXT=0 pip install --no-build-isolation gptqmodel==7.6.0``; it runs with
``GPTQMODEL_CPU_WORKERS=2``; ``optimum==2.3.0`` is added so that transformers' own GPTQ loader
(``AutoModelForCausalLM.from_pretrained``) opens our folder too. It is never a dependency of the package.

Run: ``.venv/bin/python bench/gptq.py --setup`` once (minutes), then ``.venv/bin/python bench/gptq.py``
(writes bench/results/gptq.md). ``--ours-only`` skips GPTQModel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE / "venvs" / "gptqmodel"
PY = VENV / "bin" / "python"
GPTQMODEL_PIN = "gptqmodel==7.6.0"
OPTIMUM_PIN = "optimum==2.3.0"  # transformers' GPTQ loader needs it (and gptqmodel)


def setup() -> None:
    """Create bench/venvs/gptqmodel with GPTQModel 7.6.0 on a CPU-only torch."""
    sys.path.insert(0, str(HERE))
    from common import anchor_venv

    pip = anchor_venv(VENV)
    subprocess.run([*pip, "setuptools", "wheel"], check=True)
    subprocess.run([*pip, "--no-build-isolation", GPTQMODEL_PIN], check=True,
                   env={**os.environ, "BUILD_CUDA_EXT": "0"})
    subprocess.run([*pip, OPTIMUM_PIN], check=True)


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB from /usr/bin/time, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, *cmd], capture_output=True, text=True,
                           env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[:3]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        rss_kb = float(Path(tf.name).read_text().split()[-1])
    return wall, rss_kb / 1024, p.stdout


OURS = """
import sys, time, torch
from pathlib import Path
from typing import Any
from llmcourse.core.threads import apply_threads, choose_threads
apply_threads(choose_threads(None))  # as the CLI: the cores idle at start
from llmcourse.core.models import load_model
from llmcourse.quant.gptq import GPTQConfig, quantize_model, save_quantized
windows = torch.load(sys.argv[1])
t0 = time.perf_counter()
lm = load_model("default")
cfg = GPTQConfig(bits=4, group_size=128, sym=True, damp=0.01, act_group_aware=sys.argv[3] == "gar")
report = quantize_model(lm.model, windows, cfg)
Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
save_quantized(lm.model, lm.tokenizer, sys.argv[2], cfg, report, source="default")
print(time.perf_counter() - t0)
"""

GPTQMODEL_QUANTIZE = """
import sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
windows = torch.load(sys.argv[1])
t0 = time.perf_counter()
cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01, true_sequential=True,
                     act_group_aware=sys.argv[4] == "gar")
# fp32 as ours: left to itself GPTQModel picks bf16 on a CPU (auto_dtype), and its calibration,
# residual stream and Hessians are then bf16, which costs perplexity
model = GPTQModel.load(sys.argv[3], cfg, dtype=getattr(torch, sys.argv[5]))
calib = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
model.quantize(calib, batch_size=1)
model.save(sys.argv[2])
print(time.perf_counter() - t0)
"""

GPTQMODEL_LOAD = """
import json, sys, time, torch
from gptqmodel import BACKEND, GPTQModel
ids = torch.load(sys.argv[2])
model = GPTQModel.load(sys.argv[1], backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)  # its CPU kernel: fp16|bf16
with torch.inference_mode():
    logits = model.model(input_ids=ids).logits[0].float()
torch.save(logits, sys.argv[3])
prompt = ids[:, :8]
t0 = time.perf_counter()
out = model.generate(input_ids=prompt, max_new_tokens=int(sys.argv[4]), min_new_tokens=int(sys.argv[4]), do_sample=False)
dt = time.perf_counter() - t0
print(json.dumps({"decode_tok_s": (out.shape[1] - prompt.shape[1]) / dt}))
"""


TRANSFORMERS_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, GPTQConfig
ids = torch.load(sys.argv[2])
# backend "torch": GPTQModel's plain torch kernel; the default on a CPU is torch's fused int4 kernel, which
# needs the group size to divide every width (SmolLM2's 576 is not a multiple of 128)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float32,
                                             quantization_config=GPTQConfig(bits=4, backend="torch"))
with torch.inference_mode():
    torch.save(model(input_ids=ids).logits[0].float(), sys.argv[3])
"""


def _script(text: str, d: Path, name: str) -> str:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def decode_tok_s(models: dict[str, Any], n: int, runs: int = 5) -> dict[str, float]:
    """Greedy decode tokens/s of each (model, tokenizer): median of ``runs`` interleaved runs, after one
    warm-up run of the same length (the compiled step is built then)."""
    from llmcourse.decoding import GenerationConfig, generate

    cfg = GenerationConfig(strategy="greedy", max_new_tokens=n, eos_token_ids=())
    for model, tok in models.values():
        generate(model, tok, "The history of", cfg)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, (model, tok) in models.items():
            speeds[name].append(generate(model, tok, "The history of", cfg).tokens_per_second)
    return {name: statistics.median(v) for name, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create GPTQModel's venv and exit")
    ap.add_argument("--calib", default="32x256,128x512", help="calibration sizes NxT, comma-separated")
    ap.add_argument("--orders", default="gar,plain",
                    help="column orders, comma-separated: gar (group-aware reordering), plain (default gar,plain)")
    ap.add_argument("--ppl-tokens", type=int, default=16384,
                    help="eval tokens for perplexity (default 16384: on 4096, 1-3%% is run-to-run spread)")
    ap.add_argument("--gptqmodel-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype GPTQModel quantizes in (default float32, as ours; its own CPU default is bfloat16)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens for decode speed (default 64)")
    ap.add_argument("--seeds", default="0",
                    help="calibration seeds, comma-separated (default 0): each seed draws other windows, which both "
                         "quantizers get; with several, the table also gives the mean perplexity ratio per size")
    ap.add_argument("--skip-checks", action="store_true",
                    help="only quantize and score: no decode speed, no loading by GPTQModel or transformers")
    ap.add_argument("--reuse", action="store_true",
                    help="score a folder already in --out instead of quantizing again (its time and memory: nan)")
    ap.add_argument("--ours-only", action="store_true", help="skip GPTQModel")
    ap.add_argument("--out", default=None, help="keep the quantized folders here (default: a temporary folder)")
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    import torch

    from llmcourse.core.data import calibration_windows, load_text, tokenize_stream
    from llmcourse.core.evaluate import compare, perplexity
    from llmcourse.core.models import default_model_dir, load_model
    from llmcourse.quant.gptq import load_quantized

    sys.path.insert(0, str(HERE))
    from common import write_result

    fp = load_model("default")
    ids = tokenize_stream(fp.tokenizer, load_text("default", "eval"))
    ppl_fp = perplexity(fp.model, ids, max_length=512, stride=512, max_tokens=args.ppl_tokens)["perplexity"]
    use_gptqmodel = not args.ours_only and PY.exists()
    work = Path(args.out or tempfile.mkdtemp(prefix="gptq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    orders = args.orders.split(",")
    if not set(orders) <= {"gar", "plain"}:
        raise SystemExit(f"--orders: use gar and/or plain, not {args.orders!r}")
    seeds = [int(x) for x in args.seeds.split(",")]
    for spec, seed in ((spec, seed) for spec in args.calib.split(",") for seed in seeds):
        n, t = (int(x) for x in spec.lower().split("x"))
        windows = calibration_windows(fp.tokenizer, n, t, seed=seed)
        tag = spec if seed == 0 else f"{spec}-seed{seed}"  # (seed 0 keeps the folder names it always had)
        wfile = work / f"windows-{n}x{t}{'' if seed == 0 else f'-seed{seed}'}.pt"
        torch.save(windows, wfile)
        for order in orders:
            runs = [("llmcourse", work / f"ours-{tag}-{order}",
                     [sys.executable, _script(OURS, work, "ours.py"), str(wfile), str(work / f"ours-{tag}-{order}"),
                      order], {"LLMCOURSE_PROGRESS": "0"})]
            if use_gptqmodel:
                runs.append(("GPTQModel 7.6.0", work / f"gptqmodel-{tag}-{order}",
                             [str(PY), _script(GPTQMODEL_QUANTIZE, work, "gm.py"), str(wfile),
                              str(work / f"gptqmodel-{tag}-{order}"), str(default_model_dir()), order,
                              args.gptqmodel_dtype],
                             {"GPTQMODEL_CPU_WORKERS": "2"}))
            for name, folder, cmd, env in runs:
                if args.reuse and (folder / "quantize_config.json").exists():
                    wall = rss = float("nan")
                else:
                    wall, rss, _ = measured(cmd, env)
                q = load_quantized(folder)
                ppl = perplexity(q.model, ids, max_length=512, stride=512, max_tokens=args.ppl_tokens)["perplexity"]
                c = compare(q.model, fp.model, ids, max_length=512, max_tokens=1024)
                rows.append({"calibration": spec, "seed": seed, "order": order, "quantizer": name, "wall_s": wall,
                             "peak_rss_mb": rss, "perplexity": ppl, "vs_fp32": ppl / ppl_fp - 1,
                             "kl": c["kl_divergence"], "top1": c["top1_agreement"]})
                print(rows[-1], flush=True)
    speed: dict[str, float] = {}
    if not args.skip_checks:
        first = work / f"ours-{args.calib.split(',')[0]}{'' if seeds[0] == 0 else f'-seed{seeds[0]}'}-{orders[0]}"
        ours = load_quantized(first)
        speed = decode_tok_s({"fp32": (fp.model, fp.tokenizer), "ours 4-bit": (ours.model, ours.tokenizer)},
                             args.decode_tokens)
        if use_gptqmodel:
            probe = ids[:, :64]
            pfile, lfile = work / "probe.pt", work / "gm_logits.pt"
            torch.save(probe, pfile)
            with torch.inference_mode():
                our_logits = ours.model(input_ids=probe).logits[0].float()

            def match(file: Path) -> tuple[float, float]:
                """Max |logit difference| and top-1 agreement of the logits in ``file`` with ours."""
                theirs = torch.load(file)
                return ((theirs - our_logits).abs().max().item(),
                        (theirs.argmax(-1) == our_logits.argmax(-1)).float().mean().item())

            p = subprocess.run([str(PY), _script(GPTQMODEL_LOAD, work, "gml.py"), str(first),
                                str(pfile), str(lfile), str(args.decode_tokens)], capture_output=True, text=True,
                               env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
            if p.returncode == 0:
                diff, agree = match(lfile)
                speed["GPTQModel torch backend (our folder)"] = json.loads(p.stdout.strip().splitlines()[-1])["decode_tok_s"]
                notes.append(f"GPTQModel loaded our folder (BACKEND.TORCH, fp32): max |logit difference| {diff:.2e} "
                             f"on 64 tokens, top-1 agreement {agree:.3f}.")
            else:
                notes.append(f"GPTQModel could not load our folder: {p.stderr.strip().splitlines()[-1][:300]}")
            tfile = work / "tf_logits.pt"
            p = subprocess.run([str(PY), _script(TRANSFORMERS_LOAD, work, "tfl.py"),
                                str(first), str(pfile), str(tfile)],
                               capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
            if p.returncode == 0:
                diff, agree = match(tfile)
                notes.append(f"transformers 5.25 (AutoModelForCausalLM.from_pretrained, GPTQConfig(backend='torch'), "
                             f"optimum 2.3.0 + GPTQModel kernels, fp32) loaded our folder: max |logit difference| {diff:.2e}, top-1 agreement {agree:.3f}.")
            else:
                notes.append(f"transformers could not load our folder: {p.stderr.strip().splitlines()[-1][:300]}")
    table = ["| calibration | seed | order | quantizer | wall s | peak RSS MB | perplexity | vs fp32 | KL | top-1 |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['calibration']} | {r['seed']} | {r['order']} | {r['quantizer']} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['perplexity']:.3f} | {100 * r['vs_fp32']:+.2f}% | {r['kl']:.4f} | "
                     f"{r['top1']:.3f} |")
    if use_gptqmodel and len(seeds) > 1:  # ours / GPTQModel, paired by seed
        table += ["", "| calibration | order | ours / GPTQModel perplexity, per seed | mean |", "|---|---|---|---:|"]
        for spec in args.calib.split(","):
            for order in orders:
                ppl = {(r["quantizer"] == "llmcourse", r["seed"]): r["perplexity"] for r in rows
                       if r["calibration"] == spec and r["order"] == order}
                ratios = [ppl[True, s] / ppl[False, s] for s in seeds]
                table.append(f"| {spec} | {order} | " + ", ".join(f"{100 * (x - 1):+.2f}%" for x in ratios)
                             + f" | {100 * (statistics.mean(ratios) - 1):+.2f}% |")
    if speed:
        table += ["", "| model | greedy decode tok/s |", "|---|---:|"]
        table += [f"| {k} | {v:.1f} |" for k, v in speed.items()]
        table += ["", f"ours 4-bit / fp32 decode: {speed['ours 4-bit'] / speed['fp32']:.2f}x (target >= 1.5x); "
                  f"median of 5 interleaved runs of {args.decode_tokens} greedy tokens, torch {torch.get_num_threads()} "
                  "threads"]
    notes.insert(0, f"fp32 perplexity {ppl_fp:.3f} on the first {args.ppl_tokens} eval tokens (window 512, stride "
                 f"512). GPTQModel quantizes in {args.gptqmodel_dtype}, ours in float32. Both quantizers: 4-bit, g128, "
                 "sym, damp 0.01, no act-order, true-sequential, the same windows; "
                 "order gar: group-aware reordering on both sides (GPTQModel's default), plain: natural order on "
                 "both (GPTQModel act_group_aware=False).")
    # (a run with other seeds, or one that scored folders it did not make, does not replace the main table)
    name = "gptq" + ("" if seeds == [0] else "-seeds") + ("-reused" if args.reuse else "")
    write_result(name, "GPTQ: llmcourse vs GPTQModel 7.6.0 (default model)", "\n".join(table), "\n\n".join(notes))


if __name__ == "__main__":
    main()
