"""Structured pruning: dropped layers and shrunk MLPs compute what the original computes with those parts
removed; the ``prune`` command's folders load in transformers and every lab; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from llmcourse.compress import (
    block_distances,
    choose_block,
    drop_layers,
    layer_similarities,
    mlp_importance,
    parse_layers,
    shrink_mlp,
)
from llmcourse.core.errors import UserError
from llmcourse.core.modules import block_inputs, decoder_blocks, run_block
from tests.conftest import tiny_folder, tiny_model


def _windows(n: int = 3, t: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropping_layers_equals_skipping_them(arch):
    model = tiny_model(arch, seed=2, **({"num_hidden_layers": 4} if arch == "llama" else {"n_layer": 4}))
    ids = _windows(1, 16)[0:1]
    _, blocks = decoder_blocks(model)
    inp = block_inputs(model, ids)[0]
    h = inp.hidden
    with torch.no_grad():
        for i in (0, 2):  # skip 1 and 3
            inp.hidden = h
            h = run_block(blocks[i], inp)
    drop_layers(model, [1, 3])
    assert model.config.num_hidden_layers == 2 and len(decoder_blocks(model)[1]) == 2
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    norm = model.model.norm if arch == "llama" else model.transformer.ln_f
    torch.testing.assert_close(norm(h), hidden[-1], atol=1e-5, rtol=1e-5)
    assert model(input_ids=ids, use_cache=True).logits.shape[1] == 16  # the KV cache is renumbered


def test_similarities_rank_a_near_identity_layer_first():
    model = tiny_model("llama", seed=5, num_hidden_layers=3)
    with torch.no_grad():  # layer 1 adds almost nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    sims = layer_similarities(model, _windows())
    assert max(range(3), key=lambda i: sims[i]) == 1 and sims[1] > 0.999


def test_block_distances_are_gromovs_angular_distance_and_find_a_near_identity_run():
    model = tiny_model("llama", seed=5, num_hidden_layers=4)
    with torch.no_grad():  # layers 1 and 2 add almost nothing to the residual stream
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-4)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-4)
    windows = _windows()
    dist = block_distances(model, windows, 2)
    assert len(dist) == 3 and choose_block(dist, 2) == [1, 2] and dist[1] < 1e-2
    with torch.no_grad():  # hidden_states[l] is the input of layer l (the last one is after the final norm)
        hs = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in windows]
    for l in (0, 1):
        cos = torch.cat([torch.nn.functional.cosine_similarity(h[l], h[l + 2], dim=-1).flatten() for h in hs])
        assert dist[l] == pytest.approx(float(torch.arccos(cos.clamp(-1, 1)).mean() / torch.pi), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shrunk_mlp_equals_zeroed_neurons(arch):
    model = tiny_model(arch, seed=6)
    ref = tiny_model(arch, seed=6)
    imp = mlp_importance(model, _windows())
    info = shrink_mlp(model, imp, 0.75)
    width = 128 if arch == "llama" else 256
    assert info == {"intermediate_before": width, "intermediate_after": width * 3 // 4, "keep_fraction": 0.75}
    with torch.no_grad():  # the reference: the same neurons' activations forced to zero
        for block, s in zip(decoder_blocks(ref)[1], imp, strict=True):
            dropped = torch.ones(width, dtype=torch.bool)
            dropped[torch.topk(s, width * 3 // 4).indices] = False
            if arch == "llama":
                block.mlp.down_proj.weight[:, dropped] = 0
            else:
                block.mlp.c_proj.weight[dropped, :] = 0
    ids = _windows(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_parse_layers():
    assert parse_layers("3", 30) == (3, None)
    assert parse_layers("20,21,22", 30) == (3, [20, 21, 22])
    for bad in ("30", "31", "0", "1,99", "x"):
        with pytest.raises(UserError):
            parse_layers(bad, 30)


def _tiny_folder(tmp_path, layers: int = 3):
    return tiny_folder(tmp_path / "tiny", seed=1, num_hidden_layers=layers)


def test_prune_command_folders_load_everywhere_and_refusals(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llmcourse.cli import main
    from llmcourse.core.models import load_model

    src = _tiny_folder(tmp_path)
    capsys.readouterr()
    cal = ["--samples", "4", "--seq-len", "64", "--json", "--threads", "1"]
    runs = {"sg": ["--method", "sparsegpt", "--nm", "2:4"], "wa": ["--method", "wanda", "--sparsity", "0.5"],
            "depth": ["--layers", "1"], "width": ["--width", "0.5"]}
    for name, flags in runs.items():
        assert main(["prune", "--model", str(src), "--out", str(tmp_path / name), *flags, *cal]) == 0
        data = json.loads(capsys.readouterr().out)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        lm = load_model(str(tmp_path / name))
        if name in ("sg", "wa"):
            assert data["sparsity"] == 0.5 and set(data["layer_sparsity"].values()) == {0.5}
            assert float((lm.model.model.layers[2].mlp.up_proj.weight == 0).float().mean()) == 0.5
            log = json.loads((tmp_path / name / "prune_log.json").read_text())
            assert len(log["layer_log"]) == 21
        elif name == "depth":
            assert hf.config.num_hidden_layers == 2 and len(data["depth"]["similarities"]) == 3
        else:
            assert hf.config.intermediate_size == 64 and lm.model.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
            assert data["parameters_after"] < data["parameters_before"]
    assert main(["eval", "perplexity", "--model", str(tmp_path / "sg"), "--max-tokens", "64", "--max-length", "32",
                 "--stride", "16", "--json", "--threads", "1"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad"
    for flags in (["--sparsity", "0"], ["--sparsity", "1"], ["--sparsity", "1.5"], ["--nm", "4:4"], ["--nm", "5:4"],
                  ["--layers", "3"], ["--width", "1.0"], ["--layers", "1", "--nm", "2:4"]):
        assert main(["prune", "--model", str(src), "--out", str(bad), *flags, "--samples", "2", "--seq-len", "32",
                     "--threads", "1"]) == 2
        assert not bad.exists()
    err = capsys.readouterr().err
    assert err.count("llmcourse: error:") == 8 and len(err.strip().splitlines()) == 8
