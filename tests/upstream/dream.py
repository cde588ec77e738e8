"""Dream ``diffusion_generate`` / ``_sample`` (Dream-org/Dream-v0 ``generation_utils.py``, as kept in
github.com/NVlabs/Fast-dLLM dream/model/generation_utils.py), restated.

The whole answer is one block of ``max_new_tokens`` masks decoded in ``steps`` steps on the
grid ``timesteps = linspace(1, eps, steps + 1)`` (fp32). The model's logits are shifted right
by one (position i is predicted from the output at i - 1). ``sample_tokens`` divides by the
temperature (T > 0), applies top-p (keep while the mass before a token is at most p) and then
top-k, takes the softmax, and draws a token (T > 0) or the argmax (T = 0); its confidence is the
token's probability, top-1 minus top-2 (``topk_margin``) or ``sum p log(p + 1e-10)``
(``entropy``).

* ``alg="origin"``: every mask is revealed with probability ``1 - s/t`` (1 at the last step).
* otherwise: ``int(num_masks * (1 - s/t))`` masks (all at the last step), ``num_masks`` being the
  batch's masks divided by the batch size, are committed: the top ones by confidence, or
  ``multinomial(softmax(confidence / alg_temp))`` without replacement.

Nothing is suppressed: a drawn mask id is written and the position stays masked.

Harness changes: ``model(x, attention_mask, position_ids)`` returns logits with attention over
the whole sequence (Dream's ``"full"``); ``categorical_fn(probs)``, ``rand_fn(step, mask_index)`` (one
uniform per masked position, row-major) and ``multinomial_fn(step, probs, k)`` replace the torch
draws (default: torch's).
"""

import torch
import torch.nn.functional as F


def top_p_logits(logits, top_p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False,
                  categorical_fn=None):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        if categorical_fn is None:
            x0 = torch.distributions.Categorical(probs=probs).sample()
        else:
            x0 = categorical_fn(probs)
        confidence = torch.gather(probs, -1, x0[..., None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        top = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top[:, 0] - top[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def diffusion_generate(model, input_ids, max_new_tokens, steps, mask_token_id, eps=1e-3, alg="origin",
                       alg_temp=None, temperature=0.0, top_p=None, top_k=None, categorical_fn=None, rand_fn=None,
                       multinomial_fn=None):
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    timesteps = torch.linspace(1, eps, steps + 1)
    sample = dict(temperature=temperature, top_p=top_p, top_k=top_k, categorical_fn=categorical_fn)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_token_id
            u = torch.rand(*x0.shape) if rand_fn is None else rand_fn(i, mask_index)
            reveal = u < p_transfer
            _, x0[reveal] = sample_tokens(mask_logits[reveal], **sample)
            x[mask_index] = x0.clone()
            continue
        if alg == "maskgit_plus":
            confidence, x0 = sample_tokens(mask_logits, **sample)
        elif alg == "topk_margin":
            confidence, x0 = sample_tokens(mask_logits, margin_confidence=True, **sample)
        elif alg == "entropy":
            confidence, x0 = sample_tokens(mask_logits, neg_entropy=True, **sample)
        else:
            raise RuntimeError(f"Unknown alg: {alg}")
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        count = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if count > 0:
            if alg_temp is None or alg_temp == 0:
                _, transfer = torch.topk(full_confidence, count)
            else:
                probs = F.softmax(full_confidence / alg_temp, dim=-1)
                if multinomial_fn is None:
                    transfer = torch.multinomial(probs, num_samples=count)
                else:
                    transfer = multinomial_fn(i, probs, count)
            x_ = torch.zeros_like(x) + mask_token_id
            x_[mask_index] = x0.clone()
            rows = torch.arange(x.size(0))[:, None].expand_as(transfer)
            x[rows, transfer] = x_[rows, transfer]
    return x


def dream_counts(num_masks, steps, eps=1e-3):
    """The number of masks each step of Dream's confidence algorithms commits, from its formula."""
    timesteps = torch.linspace(1, eps, steps + 1)
    out, left = [], torch.tensor(num_masks)
    for i in range(steps):
        t, s = timesteps[i], timesteps[i + 1]
        count = int(left / 1 * (1 - s / t)) if i < steps - 1 else int(left)
        out.append(count)
        left = left - count
    return out
