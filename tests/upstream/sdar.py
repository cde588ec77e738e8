"""SDAR ``block_diffusion_generate`` (github.com/JetAstra/SDAR, generate.py), restated.

Blocks are aligned to absolute positions: ``prompt_length // block_length`` whole blocks are
prefilled and decoding starts at the block holding the end of the prompt. Each block has
``denoising_steps`` steps whose counts split the whole ``block_length`` evenly (also in that
first, partly prompt-filled block). A step predicts every column of the block (temperature,
top-k, then top-p: keep while the mass before a token is at most p), and commits

* ``low_confidence_static``: the ``topk`` of the masked confidences (``-inf`` elsewhere);
* ``low_confidence_dynamic``: every mask above ``confidence_threshold`` if at least the count
  passes, else that ``topk``;
* ``sequential``: the ``count`` columns from the first mask.

When the count exceeds the masks left (the dynamic rule committed more than its count earlier,
or the first block is partly prompt), upstream's ``topk`` also picks non-mask columns, chosen
among ``-inf`` ties by ``torch.topk``'s unspecified order, and overwrites them with their
predictions; ``cap_to_masks=True`` takes ``min(count, masks left)`` instead, as LLaDA2 writes it
and ddiff does. A block ends when it has no masks; generation stops
after a block once any ``stopping_criteria_idx`` token appears in the output.

Harness changes: the KV cache (``store_kv``) is replaced by recomputing the committed prefix
under the same block-causal mask (same logits); ``model(x, attention_mask, position_ids)``
returns logits; temperature 0 (a division by zero upstream) is greedy: the argmax with its
softmax probability; ``multinomial_fn(probs)`` replaces ``torch.multinomial``.
"""

import torch
import torch.nn.functional as F


def top_k_logits(logits, k):
    if k <= 0:
        return logits
    values, _ = torch.topk(logits, k)
    return torch.where(logits < values[..., -1, None], torch.full_like(logits, float("-inf")), logits)

def top_p_logits(logits, p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.scatter(torch.full_like(logits, False, dtype=torch.bool), -1, sorted_indices, remove)
    return logits.masked_fill(mask, float("-inf"))

def sample(logits, temperature=1.0, top_k=0, top_p=1.0, multinomial_fn=None):
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    logits = logits.reshape(-1, vocab)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_logits(logits, top_k)
    if top_p < 1.0:
        logits = top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    if temperature == 0.0:
        token = probs.argmax(dim=-1, keepdim=True)
    else:
        token = torch.multinomial(probs, 1) if multinomial_fn is None else multinomial_fn(probs)
    return token.view(*shape), torch.gather(probs, -1, token).view(*shape)

def num_transfer_tokens(block_length, steps):
    out = torch.zeros(steps, dtype=torch.int64) + block_length // steps
    out[: block_length % steps] += 1
    return out

@torch.no_grad()
def block_diffusion_generate(model, input_ids, mask_id, gen_length=128, block_length=8, denoising_steps=8,
                             temperature=1.0, top_k=0, top_p=1.0, remasking_strategy="low_confidence_dynamic",
                             confidence_threshold=0.85, stopping_criteria_idx=None, multinomial_fn=None,
                             cap_to_masks=False):
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks, dtype=torch.bool))
    attention = block_mask.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None]
    position_ids = torch.arange(total_length)[None]
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids
    counts = num_transfer_tokens(block_length, denoising_steps)
    nfe = 0
    for num_block in range(prompt_length // block_length, num_blocks):
        bs, be = num_block * block_length, (num_block + 1) * block_length
        cur_x = x[:, bs:be].clone()
        for step in range(denoising_steps + 1):
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                break
            window = torch.cat([x[:, :bs], cur_x], dim=1)
            logits = model(window, attention[:, :, :be, :be], position_ids[:, :be])[:, bs:be]
            nfe += 1
            x0, x0_p = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              multinomial_fn=multinomial_fn)
            count = int(counts[step])  # IndexError once masks outlive the schedule, as upstream
            if cap_to_masks:
                count = min(count, int(mask_index.sum()))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if remasking_strategy == "sequential":
                first = int(mask_index[0].nonzero(as_tuple=True)[0].min())
                transfer[0, first:first + count] = True
            else:
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                if remasking_strategy == "low_confidence_dynamic" and \
                        (confidence[0] > confidence_threshold).sum() >= count:
                    transfer[0] = confidence[0] > confidence_threshold
                else:
                    _, idx = torch.topk(confidence[0], count)
                    transfer[0, idx] = True
            cur_x[transfer] = x0[transfer]
        x[:, bs:be] = cur_x
        if stopping_criteria_idx is not None and any(i in x[:, prompt_length:] for i in stopping_criteria_idx):
            break
    return x, nfe
