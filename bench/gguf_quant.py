"""Quantize time of the default model per llama.cpp preset: ours vs ``llama_model_quantize`` (1 thread).

Both start from the same F32 GGUF (our converter's, byte-identical to llama.cpp's ``convert_hf_to_gguf.py``)
in the same run; each timing is the median of ``--repeats`` runs. Also checks that the two files are
byte-identical, and times the converter's F32/F16/BF16 output against llama.cpp's F32 -> F16/BF16.

    .venv/bin/python bench/gguf.py [--repeats 3] [--presets Q4_K_M,Q8_0]

Writes the markdown table to bench/results/gguf.md. Absolute times are noisy on a shared 2-core
machine; the ratio column compares runs made back to back.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def llama_quantize(src: Path, out: Path, ftype: int, pure: bool) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, 1, pure
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--presets", default=None, help="comma-separated presets (default: all of the course's)")
    args = ap.parse_args()

    import torch

    from llmcourse.core.models import load_model
    from llmcourse.quant.gguf import convert_to_gguf as convert
    from llmcourse.quant.gguf.presets import COURSE_PRESETS, get_preset, quantize_gguf

    torch.set_num_threads(1)
    presets = args.presets.split(",") if args.presets else ["F16", "BF16"] + COURSE_PRESETS
    lm = load_model("default")
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as tmp:
        tmp = Path(tmp)
        src = tmp / "smollm2-f32.gguf"
        conv = {}
        for outtype in ("f32", "f16", "bf16"):
            conv[outtype] = timed(lambda o=outtype: convert(lm.model, lm.tokenizer, tmp / f"conv-{o}.gguf", o,
                                                             folder=lm.path), args.repeats)
        os.replace(tmp / "conv-f32.gguf", src)
        n_el = 134_515_008
        for name in presets:
            p = get_preset(name)
            ours, ref = tmp / f"ours-{name}.gguf", tmp / f"ref-{name}.gguf"
            t_ref = timed(lambda p=p, ref=ref: llama_quantize(src, ref, int(p.ftype), p.pure), args.repeats)
            t_ours = timed(lambda p=p, ours=ours: quantize_gguf(src, ours, p), args.repeats)
            same = ours.read_bytes() == ref.read_bytes()
            size = ours.stat().st_size
            rows.append((name, size / 1e6, 8 * size / n_el, t_ours, t_ref, t_ours / t_ref, same))
            print(f"{name:7} ours {t_ours:6.2f} s  llama.cpp {t_ref:6.2f} s  ratio {t_ours / t_ref:5.2f}  "
                  f"identical={same}", file=sys.stderr)
            ours.unlink()
            ref.unlink()
    from common import write_result

    lines = [
        f"Default model (SmolLM2-135M, {n_el:,} weights), from the same F32 GGUF; median of {args.repeats} runs, "
        "both in the same process, one torch thread. Shared 2-core machine: absolute times are noisy, the ratio "
        "compares back-to-back runs. `identical`: our file's bytes equal llama.cpp's.",
        "",
        "| type | file MB | file bits/weight | ours (s) | llama.cpp (s) | ours / llama.cpp | identical |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {'yes' if r[6] else 'NO'} |"
              for r in rows]
    lines += ["", "Converter (HF model in memory -> GGUF file, ours; files byte-identical to llama.cpp's "
              "`convert_hf_to_gguf.py`, checked by tests/quant/gguf/test_convert.py with LLAMA_CPP_CONVERT):", "",
              "| output | seconds |", "|---|---:|"]
    lines += [f"| {k.upper()} | {v:.2f} |" for k, v in conv.items()]
    write_result("gguf", "GGUF: quantize time per preset, ours vs llama.cpp (`llama_model_quantize`, 1 thread)",
                 "\n".join(lines))


if __name__ == "__main__":
    main()
