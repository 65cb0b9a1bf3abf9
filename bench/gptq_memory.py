"""Peak memory of GPTQ on a model larger than it should need: a synthetic Llama of >= 3 GB (fp32),
written as one safetensors shard per block, quantized reading one block at a time.

1. ``make``: a random Llama (default hidden 2048, 18 blocks, intermediate 5632, vocab 32000, untied
   head: about 0.94 B parameters, 3.8 GB in fp32) is built *block by block* and written as shards
   ``model-XXXXX.safetensors`` (embeddings, norm and head in the first one) with the config and the
   default model's tokenizer; at no time does more than one block live in memory.
2. ``quantize`` (a fresh process, whose peak RSS is what we report): the model skeleton is built
   on the meta device; the embeddings, final norm and head are read; ``quantize_model`` runs with
   ``load_block`` reading block ``b`` from its shard and ``done_block`` writing its GPTQ tensors to
   the output shard ``b`` and moving the block back to meta. Peak RSS ~ embeddings + head + one
   block in fp32 + the calibration activations, far below the model's size.

Run: ``.venv/bin/python bench/gptq_memory.py [--dir /tmp/gptq-mem] [--samples 8 --seq-len 128]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def config(layers: int, hidden: int, inter: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                       max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make(d: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """Write the synthetic model block by block; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from llmcourse.core.models import default_model_dir

    d.mkdir(parents=True, exist_ok=True)
    cfg = config(layers, hidden, inter, vocab)
    cfg.save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, d / name)
    g = torch.Generator().manual_seed(0)
    total = 0
    rest = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
            "model.norm.weight": torch.ones(hidden),
            "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    save_file(rest, str(d / "model-00000.safetensors"))
    total += sum(t.numel() * 4 for t in rest.values())
    del rest
    for b in range(layers):
        with torch.no_grad():
            block = LlamaDecoderLayer(cfg, b)
            for p in block.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02, generator=g)
        state = {f"model.layers.{b}.{k}": v.contiguous() for k, v in block.state_dict().items()}
        save_file(state, str(d / f"model-{b + 1:05d}.safetensors"))
        total += sum(t.numel() * 4 for t in state.values())
        del block, state
    return total


def stream_blocks(d: Path, out: Path, keep: Callable[[dict], None] | None = None) -> tuple:
    """(config, tokenizer, model, load_block, done_block) for a block-by-block pass over the sharded folder
    ``d`` (``make``'s layout) into ``out``: the model sits on the meta device with only its non-block
    tensors loaded (written to ``out`` in fp16 at once); ``load_block(b, block)`` reads block ``b`` from its
    shard, ``done_block(b, block)`` writes it to ``out`` in fp16 (after ``keep(state)``) and frees it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()

    def read(file: Path, prefix: str = "") -> dict[str, torch.Tensor]:
        with safe_open(str(file), "pt") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys()}

    rest = read(d / "model-00000.safetensors")
    model.load_state_dict(rest, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # non-persistent buffers, off meta
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in rest.items()}, str(out / "model-00000.safetensors"))
    del rest

    def load_block(b: int, block: torch.nn.Module) -> None:
        block.load_state_dict(read(d / f"model-{b + 1:05d}.safetensors", f"model.layers.{b}."), assign=True)

    def done_block(b: int, block: torch.nn.Module) -> None:
        state = {f"model.layers.{b}.{k}": (v.half() if v.is_floating_point() else v).contiguous()
                 for k, v in block.state_dict().items()}
        if keep is not None:
            keep(state)
        save_file(state, str(out / f"model-{b + 1:05d}.safetensors"))
        block.to("meta")

    return cfg, tok, model, load_block, done_block


def quantize(d: Path, out: Path, samples: int, seq_len: int) -> dict:
    """Quantize ``d`` one block at a time into ``out``; returns figures (run in a fresh process)."""
    from llmcourse.core.data import calibration_windows
    from llmcourse.quant.gptq import GPTQConfig, quantize_model
    from llmcourse.quant.gptq.model import QUANTIZE_CONFIG

    t0 = time.perf_counter()
    cfg, tok, model, load_block, done_block = stream_blocks(d, out)
    qcfg = GPTQConfig(bits=4, group_size=128)
    windows = calibration_windows(tok, samples, seq_len, seed=0) % cfg.vocab_size  # random weights: any ids do
    report = quantize_model(model, windows, qcfg, load_block=load_block, done_block=done_block)
    cfg.quantization_config = qcfg.quantize_config()
    cfg.save_pretrained(out)
    (out / QUANTIZE_CONFIG).write_text(json.dumps(qcfg.quantize_config(), indent=2))
    tok.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0, "layers": len(report["layers"]),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "gptq_below_rtn": sum(r["gptq_error"] <= r["rtn_error"] for r in report["layers"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/gptq-mem", help="work folder (default /tmp/gptq-mem)")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--step", choices=["all", "quantize"], default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = Path(args.dir)
    if args.step == "quantize":
        print(json.dumps(quantize(d / "model", d / "gptq", args.samples, args.seq_len)))
        return
    t0 = time.perf_counter()
    size = make(d / "model", args.layers, args.hidden, args.intermediate, args.vocab)
    made = time.perf_counter() - t0
    p = subprocess.run([sys.executable, __file__, "--dir", str(d), "--samples", str(args.samples), "--seq-len",
                        str(args.seq_len), "--step", "quantize"], capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    out_size = sum(f.stat().st_size for f in (d / "gptq").glob("*.safetensors"))
    print(f"synthetic Llama: {size / 1e9:.2f} GB fp32 in {args.layers + 1} shards (written in {made:.0f} s); "
          f"GPTQ 4-bit g128 on {args.samples} x {args.seq_len} tokens: {r['seconds']:.0f} s, peak RSS "
          f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({100 * r['peak_rss_bytes'] / size:.0f}% of the model); "
          f"output {out_size / 1e9:.2f} GB; GPTQ error <= RTN in {r['gptq_below_rtn']}/{r['layers']} layers")


if __name__ == "__main__":
    main()
