"""LLaDA ``generate`` (github.com/ML-GSAI/LLaDA, generate.py), restated.

Semi-autoregressive blocks over a whole-sequence forward; each block's masks are split evenly
over its steps (``get_num_transfer_tokens``); every step takes the argmax of Gumbel-perturbed
logits (float64, ``exp(logits) / E^T`` with ``E`` exponential), measures ``low_confidence``
(softmax of the logits) or ``random`` confidence, and commits the top-k masked positions up to
the current block's end. Nothing is suppressed: a predicted mask id is committed and stays a
mask, so it is a candidate again at the next step (``mask_index`` covers the whole sequence).

``confidence_eos_eot_inf`` reproduces upstream's chained assignment
``logits_with_noise[..., eos] = logits[..., eot] = -inf`` (after the argmax): at temperature 0
``logits_with_noise`` *is* ``logits``, so both ids leave the confidence softmax; at T > 0 only EOT.

Harness changes: ``model(x, attention_mask)`` returns logits; ``exponential_fn(step, bs, be,
shape)`` / ``uniform_fn(step, bs, be, shape)`` replace ``torch.rand`` (default: torch.rand).
"""

import torch
import torch.nn.functional as F


def num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


def gumbel_perturbed(logits, temperature, exponential):
    if temperature == 0:
        return logits  # the same object: confidence_eos_eot_inf then writes into the logits
    return logits.to(torch.float64).exp() / exponential.to(torch.float64) ** temperature


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.0,
             cfg_scale=0.0, remasking="low_confidence", mask_id=126336, logits_eos_inf=False,
             confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348, exponential_fn=None, uniform_fn=None):
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], dim=-1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    counter = 0
    for num_block in range(num_blocks):
        bs, be = P + num_block * block_length, P + (num_block + 1) * block_length
        transfer_counts = num_transfer_tokens(x[:, bs:be] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits = model(torch.cat([x, un_x], dim=0), attention_mask=am).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            if temperature == 0:
                exponential = None  # add_gumbel_noise returns the logits untouched
            elif exponential_fn is None:
                exponential = -torch.log(torch.rand_like(logits, dtype=torch.float64))
            else:
                exponential = exponential_fn(counter, bs, be, logits.shape)
            perturbed = gumbel_perturbed(logits, temperature, exponential)
            x0 = torch.argmax(perturbed, dim=-1)
            if confidence_eos_eot_inf:
                perturbed[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand(x0.shape) if uniform_fn is None else uniform_fn(counter, bs, be, x0.shape)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, be:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, float("-inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(transfer_counts[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
            counter += 1
    return x
