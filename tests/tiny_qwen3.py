"""The tiny random-weight Qwen3 target the DFlash tests draft for (vocabulary 96, mask id 95)."""

import torch

VOCAB, MASK = 96, 95


def tiny_target(dtype=torch.float64, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=128, initializer_range=0.1)
    kw.update(overrides)
    return Qwen3ForCausalLM(Qwen3Config(**kw)).to(dtype).eval()
