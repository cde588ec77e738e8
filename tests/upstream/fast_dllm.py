"""Fast-dLLM ``generate`` for LLaDA (github.com/NVlabs/Fast-dLLM, llada/generate.py), restated.

LLaDA's block loop, but a block runs until it has no masks left (``while True``), and each
step commits, by ``get_transfer_index`` with a ``threshold``: the top-1 masked position and
every other one whose confidence is ``>= threshold``; or by ``get_transfer_index_dynamic``
with a ``factor``: sorting the block's candidate confidences ``c_1 >= c_2 >= ...``, the walk
stops at the first rank ``n >= 2`` with ``c_n < 1 - factor / (n + 1)`` and commits the ranks
before it, except that a failure at rank 1 or at the last rank commits one more (upstream's
``if top_i == 0 or top_i == len(threshs) - 1: top_i += 1``). Confidences are float64 softmax
probabilities; candidates are the masks up to the current block's end (earlier blocks
included). Nothing is suppressed: a committed mask id stays a mask.

Harness change: ``max_steps_per_block`` (upstream has none) raises ``RuntimeError`` where the
published loop would never end (a model that keeps predicting the mask id).
"""

import torch
import torch.nn.functional as F

from .llada import gumbel_perturbed, num_transfer_tokens


def _proposals(logits, temperature, remasking, mask_index, x):
    exponential = None if temperature == 0 else -torch.log(torch.rand_like(logits, dtype=torch.float64))
    x0 = torch.argmax(gumbel_perturbed(logits, temperature, exponential), dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    else:
        x0_p = torch.rand(x0.shape, dtype=torch.float64)
    x0 = torch.where(mask_index, x0, x)
    return x0, torch.where(mask_index, x0_p, float("-inf"))


def transfer_index(logits, temperature, remasking, mask_index, x, counts, threshold=None):
    x0, confidence = _proposals(logits, temperature, remasking, mask_index, x)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        counts = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        k = int(counts[j])
        _, select = torch.topk(confidence[j], k=k)
        transfer[j, select] = True
        if threshold is not None:
            for r in range(1, k):
                if confidence[j, select[r]] < threshold:
                    transfer[j, select[r]] = False
    return x0, transfer


def transfer_index_dynamic(logits, temperature, remasking, mask_index, x, factor=1.0):
    x0, confidence = _proposals(logits, temperature, remasking, mask_index, x)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    counts = mask_index.sum(dim=1)
    for j in range(confidence.shape[0]):
        n = int(counts[j])
        if n == 0:
            continue
        bars = [1 - factor / (rank + 1) for rank in range(1, n + 1)]
        bars[0] = -1
        ranked = torch.sort(confidence[j][mask_index[j]], descending=True)[0]
        for top_i in range(n):
            if ranked[top_i] < bars[top_i]:
                break
        if top_i == 0 or top_i == n - 1:
            top_i += 1
        _, select = torch.topk(confidence[j], k=top_i)
        transfer[j, select] = True
    return x0, transfer


@torch.no_grad()
def generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0, remasking="low_confidence",
             mask_id=126336, threshold=None, factor=None, max_steps_per_block=1000):
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt.clone()
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    nfe = 0
    for num_block in range(num_blocks):
        bs, be = P + num_block * block_length, P + (num_block + 1) * block_length
        counts = num_transfer_tokens(x[:, bs:be] == mask_id, steps)
        i = 0
        while True:
            if i >= max_steps_per_block:
                raise RuntimeError("the published loop would not end here (the mask id keeps winning)")
            nfe += 1
            mask_index = x == mask_id
            logits = model(x).logits
            mask_index[:, be:] = False
            if factor is None:
                x0, transfer = transfer_index(logits, temperature, remasking, mask_index, x,
                                              counts[:, i] if threshold is None else None, threshold)
            else:
                x0, transfer = transfer_index_dynamic(logits, temperature, remasking, mask_index, x, factor)
            x[transfer] = x0[transfer]
            i += 1
            if (x[:, bs:be] == mask_id).sum() == 0:
                break
    return x, nfe
