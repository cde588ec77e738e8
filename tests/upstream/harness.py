"""Tiny models and ddiff-noise hooks shared by the faithfulness tests.

* :func:`random_qwen3`: a random 2-layer Qwen3 (transformers) with spread-out logits. With a
  small vocabulary it predicts the mask id now and then, which is the case the published loops
  handle without suppressing it.
* :class:`LLaDASignature`: that model behind LLaDA's ``forward(input_ids, attention_mask)``
  (bidirectional, a 2-D padding mask, no position ids).
* :func:`full_attention` / :func:`block_causal`: the ``model(x, attention_mask, position_ids)``
  callables the Dream / SDAR / LLaDA2 restatements take.
* :func:`llada_noise`, :func:`dream_coin`, :func:`dream_alg_temp`: the draws the upstream loops
  make with ``torch.rand`` / ``torch.multinomial``, taken from ddiff's Philox streams at the
  rows and offsets ddiff uses, so seeded runs can be compared token for token.
"""

from types import SimpleNamespace

import torch

from ddiff.reference.rng import (STREAM_CONFIDENCE, STREAM_SELECT, STREAM_TOKEN, exponential_from_uniform,
                                 philox_gumbel, philox_uniform)


def random_qwen3(seed: int = 0, vocab: int = 32, std: float = 0.3, positions: int = 64):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=positions)
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


class LLaDASignature(torch.nn.Module):
    """A causal transformers LM made bidirectional, called as LLaDA's model is."""

    def __init__(self, lm, push_down: int = None):
        super().__init__()
        self.lm, self.push_down = lm, push_down

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        keys = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        allowed = keys[:, None, None, :] | torch.eye(T, dtype=torch.bool)[None, None]
        additive = torch.zeros(B, 1, T, T).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        logits = self.lm(input_ids=input_ids, attention_mask=additive).logits
        if self.push_down is not None:  # a trained LLaDA never predicts its mask id
            logits = logits.clone()
            logits[..., self.push_down] = -1e4
        return SimpleNamespace(logits=logits)


def full_attention(lm):
    def forward(x, attention_mask=None, position_ids=None):
        T = x.shape[1]
        mask = torch.ones(x.shape[0], 1, T, T, dtype=torch.bool) if attention_mask is None else attention_mask
        return lm(input_ids=x, attention_mask=mask, position_ids=position_ids).logits
    return forward


def block_causal(lm):
    def forward(x, attention_mask, position_ids):
        return lm(input_ids=x, attention_mask=attention_mask, position_ids=position_ids).logits
    return forward


def llada_noise(seed: int):
    """LLaDA's Gumbel exponentials and ``random`` uniforms from ddiff's streams: the pipeline
    predicts on block-shaped logits, so block position j of row b is noise row
    ``b * block_len + j`` at offset = global step."""

    def block_rows(bs, be, shape):
        rows = torch.full(shape[:2], -1, dtype=torch.int64)
        rows[:, bs:be] = torch.arange(shape[0])[:, None] * (be - bs) + torch.arange(be - bs)[None, :]
        return rows

    def exponential_fn(step, bs, be, shape):
        e = -torch.log(torch.rand(shape, dtype=torch.float64))
        rows = block_rows(bs, be, shape)[:, bs:be, None]
        u = philox_uniform(torch.tensor(seed), step, rows, torch.arange(shape[2])[None, None, :], STREAM_TOKEN)
        e[:, bs:be] = exponential_from_uniform(u).to(torch.float64)
        return e

    def uniform_fn(step, bs, be, shape):
        u = torch.rand(shape, dtype=torch.float64)
        rows = block_rows(bs, be, shape)[:, bs:be]
        u[:, bs:be] = philox_uniform(torch.tensor(seed), step, rows, torch.zeros_like(rows), STREAM_CONFIDENCE).double()
        return u

    return exponential_fn, uniform_fn


def dream_coin(seed: int, prompt_len: int):
    """Dream ``origin``'s ``torch.rand`` coins: ddiff draws one ``confidence="random"`` uniform per
    position of the single block (row ``b * L + l``, offset = step)."""

    def rand_fn(step, mask_index):
        B, T = mask_index.shape
        length = T - prompt_len
        rows = torch.arange(B)[:, None] * length + torch.arange(length)[None, :]
        u = philox_uniform(torch.tensor(seed), step, rows, torch.zeros_like(rows), STREAM_CONFIDENCE)
        full = torch.zeros(B, T)
        full[:, prompt_len:] = u
        return full[mask_index]

    return rand_fn


def dream_alg_temp(seed: int, prompt_len: int):
    """Dream's ``multinomial(softmax(confidence / alg_temp), k)`` as the Gumbel-top-k ddiff draws
    (stream ``STREAM_SELECT``, row b, index = position in the block, offset = step)."""

    def multinomial_fn(step, probs, k):
        B, T = probs.shape
        cols = torch.arange(T - prompt_len)[None, :]
        g = philox_gumbel(torch.tensor(seed), step, torch.arange(B)[:, None], cols, STREAM_SELECT)
        keys = torch.full((B, T), float("-inf"))
        keys[:, prompt_len:] = torch.where(probs[:, prompt_len:] > 0, probs[:, prompt_len:].log() + g, float("-inf"))
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices
        return order[:, :k]

    return multinomial_fn
