"""sample / filter_logits across providers.

Providers: ddiff-triton, ddiff-torch (the torch backend, ``ddiff/torch_fast/``), the eager
sort-based reference (``ddiff.reference.sampling``, what the torch backend ran before) and
torch.compile of it, LLaDA-style float64 Gumbel-max, transformers' warper chain + torch.multinomial, and
FlashInfer when it imports (``sampling_from_logits`` and, for the filtered row,
``top_k_top_p_sampling_from_logits``, on bf16 logits; see ``_flashinfer_fn``). Targets (GPU only, reported as ``target_met``):

* unfiltered ``sample`` at B=256, V=151936, bf16: >= 80% of the measured copy bandwidth;
* ``sample`` with top_k=50, top_p=0.9 at B=64, V=151936: >= 5x the sort-based reference, and
  faster than it at B=1.
"""

from __future__ import annotations

import torch

import ddiff
from benchmarks.common import copy_bandwidth_gbps, provider_unavailable, time_ms
from ddiff.reference.sampling import sample_reference

FULL_VOCABS = (32000, 126464, 151936)
FULL_BATCHES = (1, 8, 64, 256)


def _no_sync_sample(logits, backend, kw):
    """ddiff.sample without the NaN check's host sync (``sync_checks(False)``), as in a decode loop."""
    with ddiff.sync_checks(False):
        return ddiff.sample(logits, seed=1, backend=backend, **kw)


def _llada_gumbel(logits, temperature):
    """LLaDA's add_gumbel_noise + argmax: float64 noise over the whole tensor."""
    logits = logits.double()
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return (logits.exp() / gumbel_noise).argmax(-1)


def _hf_chain_multinomial(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    ids = None
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(-1)


def _flashinfer_fn(logits, filtered, temperature, top_k, top_p):
    """FlashInfer as its users call it: on the bf16 logits, with its from-logits kernels.

    ``sampling_from_logits`` / ``top_k_top_p_sampling_from_logits`` take no temperature: their
    users (vLLM's FlashInfer sampler) hand them logits already divided by it. So the tempered
    bf16 logits are made once, outside the timed call, and FlashInfer is timed on them alone;
    nothing is converted to fp32.
    """
    try:
        import flashinfer.sampling as fs
    except Exception:
        return None
    tempered = (logits / temperature).to(logits.dtype)
    if filtered:
        return lambda: fs.top_k_top_p_sampling_from_logits(tempered, top_k, top_p)
    return lambda: fs.sampling_from_logits(tempered)


def _compiled_reference():
    def ref(logits2d, temperature, top_k, top_p, min_p, seed):
        return sample_reference(logits2d, temperature, top_k, top_p, min_p, seed, 0)

    return torch.compile(ref, dynamic=False)


def run(args):
    device = args.device
    if device == "cuda":
        vocabs = FULL_VOCABS if not args.quick else (151936,)
        batches = FULL_BATCHES if not args.quick else (1, 64, 256)
    else:
        vocabs, batches = (32000,), (1, 8)
    bw = copy_bandwidth_gbps(device)
    rows = []
    compiled_ref = _compiled_reference()
    for filtered in (False, True):
        op = "sample+top_k50+top_p0.9" if filtered else "sample"
        kw = dict(temperature=0.8, top_k=50, top_p=0.9) if filtered else dict(temperature=0.8)
        for vocab in vocabs:
            for batch in batches:
                shape = f"B={batch},V={vocab},bf16"
                logits = torch.randn(batch, vocab, device=device).mul_(3).to(torch.bfloat16)
                nbytes = logits.numel() * logits.element_size()
                per_row = lambda v, dt: torch.full((batch,), v, dtype=dt, device=device)  # noqa: E731
                r_args = (logits, per_row(0.8, torch.float32), per_row(50 if filtered else 0, torch.int64),
                          per_row(0.9 if filtered else 1.0, torch.float32), per_row(0.0, torch.float32),
                          per_row(1, torch.int64))
                providers = {
                    "ddiff-triton": (lambda: _no_sync_sample(logits, "triton", kw)) if device == "cuda" else None,
                    "ddiff-torch": lambda: _no_sync_sample(logits, "torch", kw),
                    "reference(sort-based)": lambda: sample_reference(*r_args, 0),
                    "torch.compile(reference)": (lambda: compiled_ref(*r_args)) if device == "cuda" else None,
                    "transformers+multinomial": lambda: _hf_chain_multinomial(logits, 0.8, 50 if filtered else None,
                                                                              0.9 if filtered else None),
                }
                if not filtered:
                    providers["llada-float64-gumbel"] = lambda: _llada_gumbel(logits, 0.8)
                providers["flashinfer"] = _flashinfer_fn(logits, filtered, 0.8, 50, 0.9) if device == "cuda" else None
                times = {}
                for name, fn in providers.items():
                    if fn is None:
                        why = "needs a CUDA device" if device != "cuda" else "flashinfer does not import"
                        rows.append(provider_unavailable(op, shape, name, why))
                        continue
                    try:
                        ms = time_ms(fn, device, rep=10 if device == "cpu" else 20)
                    except Exception as exc:  # a provider that cannot run this shape is reported, not fatal
                        rows.append(provider_unavailable(op, shape, name, f"failed: {type(exc).__name__}: {exc}"[:120]))
                        continue
                    times[name] = ms
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    rows.append({"op": op, "shape": shape, "provider": name, "ms": ms, "gbps": gbps,
                                 "pct_copy_bw": 100 * gbps / bw if bw else None})
                ours = times.get("ddiff-triton")
                base = times.get("ddiff-torch")
                for r in rows:
                    if r["op"] == op and r["shape"] == shape and r.get("ms") and base:
                        r["speedup"] = base / r["ms"]
                if ours is not None:
                    target = None
                    if not filtered and batch == 256 and vocab == 151936 and bw:
                        target = 100 * nbytes / (ours * 1e-3) / 1e9 / bw >= 80
                    reference = times.get("reference(sort-based)")
                    if filtered and vocab == 151936 and batch == 64 and reference:
                        target = reference / ours >= 5
                    if filtered and vocab == 151936 and batch == 1 and reference:
                        target = ours < reference
                    if target is not None:
                        next(r for r in rows if r["op"] == op and r["shape"] == shape
                             and r["provider"] == "ddiff-triton")["target_met"] = target
                del logits
    return rows
