"""BD3LM ``_semi_ar_sampler`` with ``first_hitting`` and nucleus sampling
(github.com/kuleshov-group/bd3lms, diffusion.py), restated.

Blocks of ``block_size`` masks are appended one at a time (the first holds BOS at position 0);
each runs up to ``num_steps`` steps and stops once the sequence has no mask. A step computes
``p_x0`` for the block from the block-causal denoiser (SUBS: the mask id gets no probability),
applies ``_nucleus_sample`` (sort the probabilities, keep those whose cumulative sum including
their own is ``<= p``, always the first, renormalise), draws a token for every position
(``_sample_categorical``), and reveals exactly one mask, chosen uniformly (first hitting: the
clock ``t *= u^(1/num_masked)`` is not read by a time-agnostic model). ``p_x0`` is reused when
a step changed nothing (it always changes one position here).

Harness changes: the denoiser is ``model(x)`` over the whole prefix (block-causal, so the
same logits as BD3LM's KV cache); ``choose_fn(step, masked)`` (one masked index per row) and
``categorical_fn(step, probs)`` (``[B, L]`` tokens) replace ``torch.randint`` and the
``torch.rand`` Gumbel race.
"""

import torch


def nucleus(p_x0, p):
    if p == 1.0:
        return p_x0
    sorted_probs, sorted_indices = p_x0.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) <= p
    keep[..., 0] = True
    out = torch.zeros_like(p_x0).scatter_(-1, sorted_indices, sorted_probs * keep)
    return out / out.sum(-1, keepdim=True)


@torch.no_grad()
def semi_ar_sampler(model, n_samples, num_strides, block_size, num_steps, mask_index, bos_id, nucleus_p=1.0,
                    choose_fn=None, categorical_fn=None):
    x_accum = None
    step = 0
    nfe = 0
    for stride in range(num_strides):
        block = torch.full((n_samples, block_size), mask_index, dtype=torch.long)
        if stride == 0:
            block[:, 0] = bos_id
            x_accum = block
        else:
            x_accum = torch.cat([x_accum, block], dim=1)
        p_x0 = None
        for _ in range(num_steps):
            if not (x_accum == mask_index).any():
                break
            if p_x0 is None:
                logits = model(x_accum)[:, -block_size:].to(torch.float64)
                logits[..., mask_index] = float("-inf")
                p_x0 = nucleus(logits.log_softmax(-1).exp(), nucleus_p)
                nfe += 1
            current = x_accum[:, -block_size:]
            masked = current == mask_index
            x_block = categorical_fn(step, p_x0)
            ind = choose_fn(step, masked)
            reveal = torch.arange(block_size)[None, :] == ind[:, None]
            x_block = torch.where(reveal, x_block, current)
            x_block = torch.where(current != mask_index, current, x_block)
            if not torch.equal(x_block, current):
                p_x0 = None
            x_accum = torch.cat([x_accum[:, :-block_size], x_block], dim=1)
            step += 1
    return x_accum, nfe
