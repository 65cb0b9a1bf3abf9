"""The 8-bit lab's layout and its folders seen by other tools: one-way imports, the two quantization
steps, plain transformers refusing an int8 folder, and de-quantizing back to a plain model."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_folder, tiny_model

import llmcourse.quant.int8 as int8
from llmcourse.quant.int8 import (
    Int8Config,
    Int8Embedding,
    Int8Linear,
    LLMInt8Linear,
    dequantize_model,
    load_quantized,
    quantize_model,
    quantized_state_dict,
    save_quantized,
    swap_modules,
)

PKG = Path(int8.__file__).parent
# Each module may import only the modules of the package listed for it (one direction).
ALLOWED = {
    "formulas": set(),
    "linear": {"formulas"},
    "llm_int8": {"formulas"},
    "model": {"formulas", "linear", "llm_int8"},
    "commands": {"__init__", "formulas", "model"},
    "tour": {"formulas", "llm_int8", "model"},
    "__init__": set(),
}


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    monkeypatch.setenv("LLMCOURSE_INT8_COMPILE", "0")
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "rows")  # the weight-only product (W8A8: test_int8_blocks.py)


def _package_imports(path: Path) -> set[str]:
    """Modules of llmcourse.quant.int8 that ``path`` imports anywhere (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n == "llmcourse.quant.int8":
                out.add("__init__")
            elif n.startswith("llmcourse.quant.int8."):
                sub = n.split(".")[3]
                if (PKG / f"{sub}.py").exists():
                    out.add(sub)
    return out


def test_imports_go_one_way():
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules == set(ALLOWED), modules
    for name in modules:
        got = _package_imports(PKG / f"{name}.py") - {name}
        assert got <= ALLOWED[name], (name, got - ALLOWED[name])


def test_no_private_traversal_copies():
    text = "".join(p.read_text() for p in PKG.glob("*.py"))
    for old in ("def _is_linear", "def _linear_weight", "def _set_module", "def _tied_head", "def _skipped"):
        assert old not in text


def test_public_names_resolve_and_modules_keep_weight_buffers():
    for name in (n for n in int8.__all__ if n != "LAB"):
        assert getattr(int8, name) is not None, name
    for cls in (Int8Linear, Int8Embedding, LLMInt8Linear):
        assert cls.weight_buffers == ("qweight",)


@pytest.mark.parametrize("arch,cfg", [("llama", Int8Config("absmax", "row")),
                                      ("qwen2", Int8Config("zeropoint", "group", group_size=24))])
def test_state_dict_is_pure_and_swap_is_the_runtime_half(arch, cfg):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, report = quantized_state_dict(model, cfg)
    assert all(type(m) is not Int8Linear for m in model.modules())  # untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(state[f"{n}.qweight"].dtype == torch.int8 for n, kind in report["modules"].items()
               if not (report["tied"] and n == report["tied"][1]))
    q = copy.deepcopy(model)
    swap_modules(q, state, report["modules"], cfg, report["tied"])
    ref = copy.deepcopy(model)
    quantize_model(ref, cfg)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, rtol=0, atol=0)
    # the untied embedding is stored in int8 too
    assert isinstance(q.get_input_embeddings(), Int8Embedding)


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def _int8_folder(tmp_path: Path, arch: str, cfg: Int8Config) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(arch)
    report = quantize_model(model, cfg)
    out = tmp_path / f"int8-{arch}"
    out.mkdir()
    save_quantized(model, _NoTokenizer(), out, cfg, report, source="tiny")
    return out, model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plain_transformers_refuses_an_int8_folder(tmp_path, arch, monkeypatch):
    """transformers itself: from_pretrained raises instead of loading random embeddings (issue 15)."""
    import transformers

    out, model = _int8_folder(tmp_path, arch, Int8Config("absmax", "row"))
    with pytest.raises(ValueError, match="quant_method"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="quant_method"):
        type(tiny_model(arch)).from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llmcourse"] == "int8"
    # our own loader still reads it, and the in-memory config has no guard left
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: None))
    lm = load_quantized(out)
    assert getattr(lm.model.config, "quantization_config", None) is None
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch,cfg,tol", [
    ("llama", Int8Config("absmax", "row"), 1e-5),           # tied embedding / head
    ("qwen2", Int8Config("zeropoint", "group", group_size=24), 1e-5),
    ("gpt2", Int8Config("absmax", "tensor"), 1e-5),          # Conv1D restored
    ("llama", Int8Config("llm.int8", threshold=6.0), 0.05),  # LLM.int8() also rounded the activations
])
def test_dequantize_model_matches_the_quantized_model(arch, cfg, tol):
    q = tiny_model(arch)
    quantize_model(q, cfg)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = q(ids).logits
        plain = dequantize_model(copy.deepcopy(q))
        got = plain(ids).logits
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    kinds = {type(m).__name__ for m in plain.modules()}
    assert not kinds & {"Int8Linear", "Int8Embedding", "LLMInt8Linear"}
    assert not any(b.dtype == torch.int8 for b in plain.buffers())
    if plain.config.tie_word_embeddings:
        assert plain.get_input_embeddings().weight is plain.get_output_embeddings().weight
    if arch == "gpt2":
        assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_convert_hf_writes_a_plain_folder(tmp_path, capsys):
    """`convert hf` on an int8 folder (through LoadedModel.info["dequantize"]): plain transformers loads
    the result strictly, and its logits equal the int8 model's."""
    import transformers

    from llmcourse.cli import main
    from llmcourse.core.models import load_model

    src = tiny_folder(tmp_path / "src")
    q, hf = tmp_path / "q", tmp_path / "hf"
    assert main(["quantize", "int8", "--model", str(src), "--out", str(q), "--json"]) == 0
    capsys.readouterr()
    lm = load_model(str(q))
    assert callable(lm.info["dequantize"])
    assert main(["convert", "hf", "--model", str(q), "--out", str(hf), "--json"]) == 0
    plain, info = transformers.AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert isinstance(lm.model.model.layers[0].mlp.up_proj, Int8Linear)  # the loaded model stays int8
