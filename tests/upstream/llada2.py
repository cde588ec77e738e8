"""LLaDA2 ``generate`` (inclusionAI LLaDA2.0 ``modeling_llada2_moe.py``) and the LLaDA2.1 editing
loop (as diffusers' ``LLaDA2Pipeline`` + ``BlockRefinementScheduler`` run it), restated.

Blocks are aligned to absolute positions and the committed prefix is recomputed every step
under a block-causal mask. ``steps = min(steps, gen_length // minimal_topk)`` steps per block
with counts that split the whole ``block_length`` evenly; a step commits every mask above
``threshold`` if at least the count passes, else the ``topk`` of ``min(count, masks left)``.
With ``eos_early_stop``, a step that commits an EOS whose generated prefix is fully decoded
ends generation at once (2.0 then returns prompt + tokens through that EOS; here, as in the
normal return, only the generated tokens through it); after each block, any EOS in the output
ends generation. The result is cut after the first EOS.

2.1 editing (``editing_threshold``): at every step a decoded, non-prompt position of the block
whose new prediction differs with confidence ``> editing_threshold`` is re-written. Once the
block has no masks, up to ``max_post_steps`` further steps run; one that edits nothing ends
the block. Steps past ``steps`` reuse the last count.

Harness changes: ``model(x, attention_mask, position_ids)`` returns logits; temperature 0 is
greedy (the published 2.0 file draws with ``multinomial`` even then; diffusers' pipeline is
greedy); ``multinomial_fn(probs)`` replaces ``torch.multinomial``; ``max_steps_per_block``
(upstream has none) raises ``RuntimeError`` where the editing loop would never end (edits that
keep writing the mask id back).
"""

import torch

from .sdar import sample


def num_transfer_tokens(block_length, steps):
    if steps == 0:
        return torch.tensor([], dtype=torch.int64)
    out = torch.full((steps,), block_length // steps, dtype=torch.int64)
    out[: block_length % steps] += 1
    return out


def _decoded_eos(cur_x, committed_tokens, eos_id, mask_id, prompt_length):
    if not (committed_tokens == eos_id).any():
        return False
    positions = (cur_x[0] == eos_id).nonzero(as_tuple=True)[0]
    positions = positions[positions >= prompt_length]
    if len(positions) == 0:
        return False
    return bool((cur_x[0, prompt_length:int(positions[0])] != mask_id).all())


@torch.no_grad()
def generate(model, input_ids, temperature=0.0, block_length=32, steps=32, gen_length=2048, top_p=None, top_k=None,
             eos_early_stop=False, minimal_topk=1, threshold=0.95, eos_id=156892, mask_id=156895,
             editing_threshold=None, max_post_steps=0, multinomial_fn=None, max_steps_per_block=1000):
    steps = min(steps, gen_length // minimal_topk)
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks, dtype=torch.bool))
    allowed = block_mask.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None]
    attention = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    position_ids = torch.arange(total_length)[None]
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids
    counts = num_transfer_tokens(block_length, steps)
    editing = editing_threshold is not None
    sampling = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                    multinomial_fn=multinomial_fn)
    nfe, stopped = 0, False
    for num_block in range(prompt_length // block_length, num_blocks):
        end = (num_block + 1) * block_length
        cur_x = x[:, :end]
        start = end - block_length
        prompt_in_block = torch.arange(start, end) < prompt_length
        step_idx, post_steps, taken = 0, 0, 0
        while step_idx < steps or editing:
            taken += 1
            if taken > max_steps_per_block:
                raise RuntimeError("the published loop would not end here (edits keep re-opening the block)")
            block = cur_x[:, -block_length:]
            active = block == mask_id
            masks_left = bool(active.any())
            if not masks_left and not editing:
                break
            if not masks_left:
                post_steps += 1
                if post_steps > max_post_steps:
                    break
            logits = model(cur_x, attention[:, :, :end, :end], position_ids[:, :end])[:, -block_length:]
            nfe += 1
            x0, x0_p = sample(logits, **sampling)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if masks_left:
                count = int(counts[min(step_idx, len(counts) - 1)])
                confidence = torch.where(active, x0_p, -torch.inf)
                high = confidence[0] > threshold
                if int(high.sum()) >= count:
                    transfer[0] = high
                else:
                    _, idx = torch.topk(confidence[0], k=min(count, int(active.sum())))
                    transfer[0, idx] = True
            edit = torch.zeros_like(transfer)
            if editing:
                editable = ~active & ~prompt_in_block[None]
                edit = editable & (x0 != block) & (torch.where(editable, x0_p, -torch.inf) > editing_threshold)
            update = transfer | edit
            if update.any():
                cur_x[:, -block_length:] = torch.where(update, x0, block)
            if not masks_left and not edit.any():
                break
            if eos_early_stop and _decoded_eos(cur_x, x0[update], eos_id, mask_id, prompt_length):
                stopped = True
                break
            if masks_left:
                step_idx += 1
            elif not editing:
                break
        if stopped or (x[0, prompt_length:end] == eos_id).any():
            break
    generated = x[:, prompt_length:prompt_length + gen_length]
    eos = (generated[0] == eos_id).nonzero(as_tuple=True)[0]
    length = int(eos[0]) + 1 if len(eos) else gen_length
    return generated[:, :length], nfe
