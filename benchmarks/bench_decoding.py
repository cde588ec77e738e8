"""One confidence-remasking decoding step (predict -> score -> commit) across providers.

Providers: ddiff-triton and ddiff-torch (``predict_tokens`` + ``select_transfer``), LLaDA's
reference step (float64 Gumbel over every position, float64 softmax, a per-row ``topk`` loop)
and an fp32 eager step doing the same work as ddiff (only the masked positions).
Targets on GPU (reported as ``target_met`` on the ddiff-triton rows): >= 20x LLaDA's
reference step, >= 3x the fp32 eager step, and extra memory <= B*L*16 bytes beyond the outputs.
"""

from __future__ import annotations

import torch

import ddiff
from benchmarks.common import peak_extra_mb, provider_unavailable, time_ms

TEMPERATURE = 0.7
COMMIT_PER_ROW = 4


def llada_reference_step(x, logits, mask_id, num_transfer):
    """GSAI-ML/LLaDA generate.py, one inner iteration (low_confidence remasking)."""
    logits64 = logits.to(torch.float64)
    noise = torch.rand_like(logits64)
    gumbel_noise = (-torch.log(noise)) ** TEMPERATURE
    x0 = torch.argmax(logits64.exp() / gumbel_noise, dim=-1)
    p = torch.softmax(logits64, dim=-1)
    x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    mask_index = x == mask_id
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=num_transfer)
        transfer_index[j, select_index] = True
    return torch.where(transfer_index, x0, x)


def fp32_eager_step(x, logits, mask_id, num_transfer, block):
    """The same work as ddiff in plain fp32 torch: only the masked block, vectorised topk."""
    start, end = block
    lb = logits[:, start:end].float()
    noise = torch.rand_like(lb).clamp_min(1e-20)
    x0 = (lb / TEMPERATURE - torch.log(-torch.log(noise))).argmax(-1)
    conf = torch.softmax(lb, -1).gather(-1, x0[..., None]).squeeze(-1)
    xb = x[:, start:end]
    conf = torch.where(xb == mask_id, conf, -torch.inf)
    idx = conf.topk(num_transfer, dim=-1).indices
    commit = torch.zeros_like(xb, dtype=torch.bool).scatter_(1, idx, True)
    out = x.clone()
    out[:, start:end] = torch.where(commit, x0, xb)
    return out


def ddiff_step(x, logits, mask_id, num_transfer, backend):
    """As the pipelines run it: inside ``sync_checks(False)``, so the step never waits on the host."""
    with ddiff.sync_checks(False):
        mask = x == mask_id
        tokens, conf = ddiff.predict_tokens(logits, mask, TEMPERATURE, confidence="prob", seed=0, backend=backend)
        commit = ddiff.select_transfer(conf, mask, num_transfer=num_transfer, backend=backend)
        return torch.where(commit, tokens, x)


def _cases(args):
    if args.device == "cuda":
        return [("LLaDA block of 32", 1, 1024, 126464, (992, 1024)), ("all masked", 1, 1024, 126464, (0, 1024)),
                ("SDAR/LLaDA2 block", 8, 32, 151936, (0, 32)), ("small blocks", 64, 16, 151936, (0, 16))]
    return [("LLaDA block of 32", 1, 256, 32000, (224, 256)), ("SDAR/LLaDA2 block", 4, 32, 32000, (0, 32))]


def run(args):
    device = args.device
    rows = []
    for name, batch, length, vocab, block in _cases(args):
        shape = f"{name}: [{batch},{length},{vocab}] masked {block[1] - block[0]}"
        mask_id = vocab - 1
        logits = torch.randn(batch, length, vocab, device=device).mul_(3).to(torch.bfloat16)
        x = torch.randint(0, vocab - 1, (batch, length), device=device)
        x[:, block[0]:block[1]] = mask_id
        providers = {
            "ddiff-triton": (lambda: ddiff_step(x, logits, mask_id, COMMIT_PER_ROW, "triton")) if device == "cuda" else None,
            "ddiff-torch": lambda: ddiff_step(x, logits, mask_id, COMMIT_PER_ROW, "torch"),
            "llada-reference": lambda: llada_reference_step(x, logits, mask_id, COMMIT_PER_ROW),
            "fp32-eager": lambda: fp32_eager_step(x, logits, mask_id, COMMIT_PER_ROW, block),
        }
        times = {}
        for prov, fn in providers.items():
            if fn is None:
                rows.append(provider_unavailable("decode step", shape, prov, "needs a CUDA device"))
                continue
            try:
                ms = time_ms(fn, device, rep=5 if device == "cpu" else 20, warmup=1 if device == "cpu" else 3)
                peak = peak_extra_mb(fn, device)
            except torch.cuda.OutOfMemoryError:
                rows.append(provider_unavailable("decode step", shape, prov, "out of memory"))
                continue
            times[prov] = ms
            rows.append({"op": "decode step", "shape": shape, "provider": prov, "ms": ms, "peak_mb": peak})
        ours = times.get("ddiff-triton")
        for r in rows:
            if r["shape"] == shape and r.get("ms") and times.get("llada-reference"):
                r["speedup"] = times["llada-reference"] / r["ms"]
        if ours is not None:
            row = next(r for r in rows if r["shape"] == shape and r["provider"] == "ddiff-triton")
            outputs_mb = batch * length * (8 + 4 + 1 + 8) / 2**20  # tokens, confidence, commit mask, result
            budget_mb = batch * length * 16 / 2**20
            row["target_met"] = bool(
                times.get("llada-reference", 0) >= 20 * ours and times.get("fp32-eager", 0) >= 3 * ours
                and row["peak_mb"] is not None and row["peak_mb"] <= outputs_mb + budget_mb
            )
        del logits
    return rows
