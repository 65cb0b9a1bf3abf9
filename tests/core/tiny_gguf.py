"""Write a tiny valid llama GGUF (F32) from a tiny random HF model, with a 256-token BPE vocabulary."""

from __future__ import annotations

import gguf
import numpy as np

_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair (HF keeps the halves apart)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(model, path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    tokens = [bytes([i]).decode("latin-1") for i in range(c.vocab_size - 1)] + ["he"]
    w.add_token_list(tokens)
    w.add_token_types([1] * c.vocab_size)
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_merges(["h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        v = t.float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = key.split(".")
            short = _NAMES[".".join(parts[3:-1])]
            name = f"blk.{parts[2]}.{short}.weight"
            if short == "attn_q":
                v = _permute(v, c.num_attention_heads)
            elif short == "attn_k":
                v = _permute(v, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
