"""An independent implementation to test against: Hugging Face ``LlamaForCausalLM`` on our weights.

Only the conversion lives here (Meta key names and RoPE layout -> Hugging Face's); the model is
built from a local ``LlamaConfig``, never downloaded.
"""

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llama.model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs


def hf_config(args: ModelArgs) -> LlamaConfig:
    """The ``LlamaConfig`` of the same architecture (transformers 5.x names RoPE settings ``rope_parameters``)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(
            rope_type="llama3",
            factor=args.rope_scale_factor,
            low_freq_factor=ROPE_LOW_FREQ_FACTOR,
            high_freq_factor=ROPE_HIGH_FREQ_FACTOR,
            original_max_position_embeddings=ROPE_ORIGINAL_CONTEXT,
        )
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        rope_parameters=rope,
        max_position_embeddings=args.max_context,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows from adjacent-pair RoPE (Meta) to rotate-half RoPE (Hugging Face).

    Within each head, row 2i+c (pair i, component c) moves to row c*hd/2 + i.
    """
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = meta_to_hf_rows(sd[m + "attention.wq.weight"], args.n_heads)
        out[h + "self_attn.k_proj.weight"] = meta_to_hf_rows(sd[m + "attention.wk.weight"], args.n_kv_heads)
        out[h + "self_attn.v_proj.weight"] = sd[m + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[m + "attention.wo.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[m + "feed_forward.w1.weight"]
        out[h + "mlp.up_proj.weight"] = sd[m + "feed_forward.w3.weight"]
        out[h + "mlp.down_proj.weight"] = sd[m + "feed_forward.w2.weight"]
        out[h + "input_layernorm.weight"] = sd[m + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "ffn_norm.weight"]
    return out


def hf_model(args: ModelArgs, sd: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """``LlamaForCausalLM`` holding the Meta-format weights ``sd`` (strict: every key used)."""
    model = LlamaForCausalLM(hf_config(args)).to(next(iter(sd.values())).dtype).eval()
    model.load_state_dict(meta_to_hf_state_dict(sd, args), strict=True)
    return model


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Logits for ``tokens`` [B, S]; with ``chunk``, fed through Hugging Face's own KV cache in pieces."""
    if chunk is None:
        return model(tokens, use_cache=False).logits.float()
    cache, pieces = DynamicCache(config=model.config), []
    for start in range(0, tokens.shape[1], chunk):
        out = model(tokens[:, start : start + chunk], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits.float())
    return torch.cat(pieces, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
