"""Cheap structural checks of checkpoint files before a library parses them.

Parsers of safetensors and GGUF trust the lengths written in the header; a truncated or
corrupted file can make them raise odd errors, allocate huge buffers, or loop for long.
These checks read only the header, verify every length and offset against the file
size, and raise a one-line :class:`UserError` naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from gguf import GGUFValueType as VT

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import KV, TensorInfo, alignment, check_tensor_data, read_gguf_header


def _corrupt(path: Path, what: str, kind: str) -> UserError:
    return UserError(
        f"{path} is not a valid {kind} file ({what})",
        "the file is truncated or corrupt: re-download or re-convert it",
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# bytes per element of every dtype safetensors writes, spelled exactly as in its headers
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def check_safetensors(path: str | Path) -> dict:
    """Validate a .safetensors header completely; return the header dict.

    The header is JSON with no key twice; every tensor has a known dtype (exact spelling), a shape of
    non-negative integers and ``[start, end)`` offsets with ``end - start = prod(shape) x itemsize``;
    the tensors tile the data section exactly (sorted by offset: no overlap, no gap, no trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise _corrupt(path, "not a regular file", "safetensors")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than its 8-byte header length", "safetensors")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > 100_000_000 or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit in {size} bytes", "safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupt(path, f"header is not JSON without duplicate keys: {str(e)[:80]}", "safetensors") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object", "safetensors")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "__metadata__ is not a map of strings", "safetensors")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(path, f"bad entry for tensor {name!r}", "safetensors")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise _corrupt(path, f"tensor {name!r} has the unknown dtype {dtype!r}", "safetensors")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**40 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has the bad shape {shape!r}"[:160], "safetensors")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise _corrupt(path, f"tensor {name!r} lies outside the file", "safetensors")
        if math.prod(shape) * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise _corrupt(path, f"tensor {name!r} size does not match its shape", "safetensors")
        spans.append((offsets[0], offsets[1], name))
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            what = "overlaps the previous one" if start < pos else "leaves a gap before it"
            raise _corrupt(path, f"tensor {name!r} {what}", "safetensors")
        pos = end
    if pos != data_len:
        raise _corrupt(path, f"{data_len - pos} bytes after the last tensor", "safetensors")
    return header


# GGUF metadata, checked for what it says (issue 16): bounds a real model stays far inside
MAX_BLOCKS = 4096
MAX_WIDTH = 1 << 20  # embedding / feed-forward length
MAX_HEADS = 4096
MAX_CONTEXT = 1 << 27
MAX_VOCAB = 1 << 24
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "sep_token_id")


def check_gguf_meta(kvs: list[KV], infos: list[TensorInfo]) -> None:
    """Check that a GGUF model's metadata can describe a working model; raise ValueError naming the first problem.

    Alignment a power of two; no NaN/infinite float; at least one tensor and no name twice;
    ``{arch}.block_count``, head counts, embedding and context lengths positive integers, bounded and
    consistent with each other and with the tensors present (``blk.{i}`` for exactly ``i < block_count``,
    ``token_embd.weight`` of ``embedding_length`` columns); special token ids inside the vocabulary.
    """
    alignment(kvs)
    meta = {kv.key: kv.value for kv in kvs}
    if len(meta) != len(kvs):
        raise ValueError("a metadata key appears twice")
    for kv in kvs:
        vals = kv.value if isinstance(kv.value, list) else [kv.value]
        if (kv.vtype in (VT.FLOAT32, VT.FLOAT64) or kv.sub_type in (VT.FLOAT32, VT.FLOAT64)) and \
                not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{kv.key} holds a NaN or infinite value")
    if not infos:
        raise ValueError("it holds no tensors")
    names = {t.name for t in infos}
    if len(names) != len(infos):
        raise ValueError("a tensor name appears twice")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("general.architecture is missing")

    def count(key: str, lo: int, hi: int, required: bool = True) -> int | None:
        v = meta.get(f"{arch}.{key}")
        if v is None and not required:
            return None
        if not _is_int(v) or not lo <= v <= hi:
            raise ValueError(f"{arch}.{key} is {v!r}, not an integer in [{lo}, {hi}]")
        return v

    n_block = count("block_count", 1, MAX_BLOCKS)
    n_embd = count("embedding_length", 1, MAX_WIDTH)
    count("feed_forward_length", 1, MAX_WIDTH, required=False)
    count("context_length", 1, MAX_CONTEXT, required=False)
    n_head = count("attention.head_count", 1, MAX_HEADS, required=False)
    n_kv = count("attention.head_count_kv", 1, MAX_HEADS, required=False)
    head_dim = count("rope.dimension_count", 1, MAX_WIDTH, required=False)
    if n_head is not None:
        if n_kv is not None and n_head % n_kv:
            raise ValueError(f"{n_head} attention heads are not a multiple of {n_kv} key/value heads")
        if head_dim is None and n_embd % n_head:
            raise ValueError(f"embedding length {n_embd} is not a multiple of {n_head} heads")
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdecimal()}
    if blocks != set(range(n_block)):
        raise ValueError(f"block_count is {n_block} but the tensors hold blocks "
                         f"{min(blocks, default=-1)}..{max(blocks, default=-1)} ({len(blocks)} of them)")
    emb = next((t for t in infos if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ValueError("it has no token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != n_embd:
        raise ValueError(f"token_embd.weight is {emb.shape}, not (vocabulary, {n_embd})")
    n_vocab = emb.shape[0]
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise ValueError(f"a vocabulary of {n_vocab} tokens")
    declared = meta.get(f"{arch}.vocab_size")
    if declared is not None and declared != n_vocab:
        raise ValueError(f"{arch}.vocab_size is {declared!r} but token_embd.weight has {n_vocab} rows")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) > n_vocab):
        raise ValueError(f"the tokenizer has {len(tokens) if isinstance(tokens, list) else tokens!r} tokens "
                         f"for {n_vocab} embedding rows")
    check_tensor_types(infos)
    check_block_tensors(arch, n_block, names)
    check_tokenizer_meta(meta)
    for key in _TOKEN_IDS:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and (not _is_int(v) or not 0 <= v < n_vocab):
            raise ValueError(f"tokenizer.ggml.{key} is {v!r}, outside the vocabulary of {n_vocab}")


_INT_TYPES = ("I8", "I16", "I32", "I64")


def check_tensor_types(infos: list[TensorInfo]) -> None:
    """Weights are floats or float blocks: an integer tensor type (I8..I64) is refused, naming the tensor."""
    for t in infos:
        if t.qtype.name in _INT_TYPES:
            raise ValueError(f"tensor {t.name} has the integer type {t.qtype.name}, where a model's weights are floats")


# the weights each block of these architectures must hold (llama.cpp's names); biases and extras are optional
BLOCK_TENSORS = {
    "llama": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"),
    "gpt2": ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
}
BLOCK_TENSORS["qwen2"] = BLOCK_TENSORS["mistral"] = BLOCK_TENSORS["llama"]


def check_block_tensors(arch: str, n_block: int, names: set[str]) -> None:
    """Every block of a known architecture holds every weight it needs (a file with one dropped is refused
    before anything is read or written, not half-way through a quantization)."""
    need = BLOCK_TENSORS.get(arch)
    if need is None:
        return
    for i in range(n_block):
        for short in need:
            if f"blk.{i}.{short}.weight" not in names:
                raise ValueError(f"the tensor blk.{i}.{short}.weight is missing")
    if "output_norm.weight" not in names:
        raise ValueError("the tensor output_norm.weight is missing")


def check_tokenizer_meta(meta: dict) -> None:
    """The tokenizer fields its model type needs: a non-empty vocabulary, ``merges`` for GPT-2-style BPE,
    ``scores`` (one per token) for llama's SentencePiece."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None and tokens is None:
        return
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("the tokenizer's vocabulary (tokenizer.ggml.tokens) is missing or empty")
    if model == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not merges:
            raise ValueError("the gpt2 (BPE) tokenizer has no tokenizer.ggml.merges")
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ValueError("the llama (SentencePiece) tokenizer needs tokenizer.ggml.scores, one per token")


def read_gguf_model(path: str | Path) -> tuple[list[KV], list[TensorInfo]]:
    """Header of a GGUF model file, checked structurally and semantically (else a one-line UserError)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a regular file", "pass a .gguf file")
    try:
        kvs, infos = read_gguf_header(path)
        check_tensor_data(infos, path.stat().st_size)
        check_gguf_meta(kvs, infos)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _corrupt(path, str(e)[:160] or type(e).__name__, "GGUF") from None
    return kvs, infos


def check_gguf(path: str | Path) -> tuple[int, int]:
    """Validate a GGUF model file: its header (magic, version, metadata, tensor infos) against the file size,
    then what the metadata says (:func:`check_gguf_meta`). Returns ``(n_tensors, n_kv)``.

    Parsed by the project's one GGUF header parser (:func:`llmcourse.core.gguf_container.read_gguf_header`),
    which checks every length it reads; every tensor's data must lie inside the file. The tensor data
    itself is checked by the reader that maps it.
    """
    kvs, infos = read_gguf_model(path)
    return len(infos), len(kvs)


# config.json sizes every causal LM needs, under the names transformers' configs use (Llama/Qwen2 and GPT-2);
# the bounds are far above any real model and far below what would allocate without end
CONFIG_SIZES = {"hidden_size": 1 << 17, "num_attention_heads": 1 << 12, "num_hidden_layers": 1 << 12,
                "vocab_size": 1 << 23, "intermediate_size": 1 << 20, "max_position_embeddings": 1 << 27,
                "n_embd": 1 << 17, "n_head": 1 << 12, "n_layer": 1 << 12, "n_positions": 1 << 27}
OPTIONAL_SIZES = {"num_key_value_heads": 1 << 12, "head_dim": 1 << 14, "n_inner": 1 << 20}  # may be null


def check_config(path: str | Path) -> dict:
    """Validate the sizes in a model's ``config.json`` before any library builds a model from it.

    Plain JSON, no transformers: each size present is an integer in ``[1, bound]`` (``null`` allowed only
    where transformers fills in a default), the heads divide the hidden size and the key/value heads
    divide the heads. Return the parsed config."""
    path = Path(path)
    fix = "fix config.json (or re-export the model)"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e)[:120]})", fix) from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object", fix)
    for key, bound in {**CONFIG_SIZES, **OPTIONAL_SIZES}.items():
        if key not in cfg or (key in OPTIONAL_SIZES and cfg[key] is None):
            continue
        v = cfg[key]
        if not _is_int(v) or not 1 <= v <= bound:
            raise UserError(f"{path} has {key} = {json.dumps(v)[:40]}, not an integer in [1, {bound:,}]", fix)
    for hidden, heads in (("hidden_size", "num_attention_heads"), ("n_embd", "n_head")):
        if hidden in cfg and heads in cfg and "head_dim" not in cfg and cfg[hidden] % cfg[heads]:
            raise UserError(f"{path}: {heads} = {cfg[heads]} does not divide {hidden} = {cfg[hidden]}", fix)
    kv = cfg.get("num_key_value_heads")
    if kv is not None and "num_attention_heads" in cfg and cfg["num_attention_heads"] % kv:
        raise UserError(f"{path}: num_key_value_heads = {kv} does not divide num_attention_heads = "
                        f"{cfg['num_attention_heads']}", fix)
    return cfg


LLAMA_LIKE = ("llama", "qwen2", "mistral")


def check_shapes(cfg: dict, headers: dict[str, dict], folder: str | Path) -> None:
    """For Llama-like configs, every projection and embedding shape in the safetensors headers must be the one
    config.json implies (a cheap first look; the loader then compares every tensor with the built model)."""
    if cfg.get("model_type") not in LLAMA_LIKE or not all(k in cfg for k in ("hidden_size", "num_attention_heads",
                                                                            "intermediate_size", "vocab_size")):
        return
    h, n_heads, inter, vocab = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // n_heads
    kv = cfg.get("num_key_value_heads") or n_heads
    want = {"embed_tokens.weight": [vocab, h], "q_proj.weight": [n_heads * hd, h], "k_proj.weight": [kv * hd, h],
            "v_proj.weight": [kv * hd, h], "o_proj.weight": [h, n_heads * hd], "gate_proj.weight": [inter, h],
            "up_proj.weight": [inter, h], "down_proj.weight": [h, inter], "lm_head.weight": [vocab, h]}
    for name, info in headers.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        expect = want.get(".".join(name.split(".")[-2:]))
        if expect is not None and list(info.get("shape", [])) != expect:
            raise UserError(f"{folder} does not match its config.json: shapes that differ from config.json (e.g. "
                            f"{name} {tuple(info['shape'])}, config.json implies {tuple(expect)})",
                            "use the config.json that came with these weights")
