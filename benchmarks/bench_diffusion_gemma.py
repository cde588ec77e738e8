"""One DiffusionGemma denoising step (everything after the decoder forward), transformers vs ddiff.

transformers (``DiffusionGemmaGenerationMixin._denoising_step`` with its own classes): the
linear temperature schedule, an fp32 softmax, ``torch.multinomial``, ``argmax``,
``EntropyBoundSampler.accept_canvas`` + ``renoise_canvas``, ``StableAndConfidentStoppingCriteria``
and the cast of the processed logits to the embedding dtype (bf16) for self-conditioning.

ddiff (``ddiff.integrations.diffusion_gemma``): the same division (into a reused buffer, as the
integration does in place on the model's output), one fused ``predict_tokens`` pass
(sample, argmax, entropy), ``select_transfer(entropy_bound=)``, ``renoise_uniform``, the
stopping rule on the same entropies, and the same bf16 cast.

Logits are what ``DiffusionGemmaForBlockDiffusion`` returns: fp32 (it casts after the LM
head); a bf16-logits row is included for models that return bf16. Shapes on a GPU:
``[1, 256, 262144]`` (Gemma's canvas and vocabulary) and a batch of 4; on a CPU, smaller ones.
Target on GPU (``target_met`` on the ddiff-triton rows): >= 3x transformers' step, and extra
memory no more than the bf16 self-conditioning copy plus ``B·L·64`` bytes.
"""

from __future__ import annotations

import torch

from benchmarks.common import peak_extra_mb, provider_unavailable, time_ms

T_MIN, T_MAX, STEPS, CUR_STEP = 0.4, 0.8, 48, 30
ENTROPY_BOUND = 0.1
STABILITY, CONFIDENCE = 1, 0.005


def _transformers_step(logits, canvas, cur_step, processor, sampler, criteria, sc_dtype):
    """The body of transformers' ``_denoising_step`` after the forward (no finished rows)."""
    cur = torch.tensor(cur_step, device=logits.device, dtype=torch.int32)
    processed = processor(None, logits, cur_step=cur)
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    batch, length, vocab = logits.shape
    denoiser = torch.multinomial(probs.view(-1, vocab), num_samples=1).squeeze(-1).view(batch, length)
    argmax = torch.argmax(processed, dim=-1)
    accepted = sampler.accept_canvas(canvas, denoiser, processed, cur)
    new_canvas = sampler.renoise_canvas(accepted, cur)
    criteria.reset()
    stop = criteria(argmax, processed)
    return new_canvas, argmax, processed.to(sc_dtype), stop


def _ddiff_step(logits, buffer, cur_step, backend, sc_dtype):
    import ddiff
    from ddiff.integrations import diffusion_gemma as ddg

    temperature = ddg.linear_temperature(cur_step, T_MIN, T_MAX, STEPS, device=logits.device)
    processed = torch.div(logits, temperature, out=buffer)
    with ddiff.sync_checks(False):
        out = ddg.entropy_bound_step(processed, entropy_bound=ENTROPY_BOUND, seed=0, offset=cur_step,
                                     backend=backend)
        stop, _ = ddg.stable_and_confident(None, out.argmax, out.entropy, stability_threshold=STABILITY,
                                           confidence_threshold=CONFIDENCE)
    return out.canvas, out.argmax, processed.to(sc_dtype), stop


def _cases(args):
    if args.device == "cuda":
        cases = [(1, 256, 262144, torch.float32), (1, 256, 262144, torch.bfloat16)]
        if not args.quick:
            cases.append((4, 256, 262144, torch.float32))
        return cases
    if args.quick:
        return [(1, 32, 8192, torch.float32)]
    return [(1, 256, 32768, torch.float32), (1, 64, 262144, torch.float32), (1, 64, 32768, torch.bfloat16)]


def run(args):
    try:
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as dg
    except ImportError:
        return [provider_unavailable("diffusion gemma step", "-", "transformers", "transformers has no DiffusionGemma")]
    device = args.device
    rows = []
    for batch, length, vocab, dtype in _cases(args):
        shape = f"[{batch},{length},{vocab}] {str(dtype)[6:]} logits, bf16 self-conditioning"
        g = torch.Generator(device=device).manual_seed(0)
        # Softcapped-looking logits (|x| <= 30) with a few confident positions.
        logits = (torch.randn(batch, length, vocab, device=device, generator=g) * 4).clamp_(-30, 30).to(dtype)
        logits[:, ::8, 7] = 30.0
        canvas = torch.randint(0, vocab, (batch, length), device=device, generator=g)
        processor = dg.LinearTemperatureScheduleLogitsProcessor(T_MIN, T_MAX, STEPS)
        sampler = dg.EntropyBoundSampler(dg.EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND), length, vocab,
                                         STEPS)
        criteria = dg.StableAndConfidentStoppingCriteria(STABILITY, CONFIDENCE)
        buffer = torch.empty_like(logits)
        providers = {
            "transformers": lambda: _transformers_step(logits, canvas, CUR_STEP, processor, sampler, criteria,
                                                       torch.bfloat16),
            "ddiff-triton": (lambda: _ddiff_step(logits, buffer, CUR_STEP, "triton", torch.bfloat16))
            if device == "cuda" else None,
            "ddiff-torch": lambda: _ddiff_step(logits, buffer, CUR_STEP, "torch", torch.bfloat16),
        }
        times, peaks = {}, {}
        for prov, fn in providers.items():
            if fn is None:
                rows.append(provider_unavailable("diffusion gemma step", shape, prov, "needs a CUDA device"))
                continue
            try:
                ms = time_ms(fn, device, rep=5 if device == "cpu" else 20, warmup=1 if device == "cpu" else 3)
                peak = peak_extra_mb(fn, device)
            except torch.cuda.OutOfMemoryError:
                rows.append(provider_unavailable("diffusion gemma step", shape, prov, "out of memory"))
                continue
            times[prov], peaks[prov] = ms, peak
            bytes_read = logits.numel() * logits.element_size()
            rows.append({"op": "diffusion gemma step", "shape": shape, "provider": prov, "ms": ms, "peak_mb": peak,
                         "gbps": bytes_read / (ms * 1e-3) / 1e9})
        base = times.get("transformers")
        for r in rows:
            if r["shape"] == shape and r.get("ms") and base:
                r["speedup"] = base / r["ms"]
        ours = times.get("ddiff-triton")
        if ours is not None and base is not None:
            row = next(r for r in rows if r["shape"] == shape and r["provider"] == "ddiff-triton")
            budget_mb = (batch * length * vocab * 2 + batch * length * 64) / 2**20
            row["target_met"] = bool(base >= 3 * ours and peaks["ddiff-triton"] is not None
                                     and peaks["ddiff-triton"] <= budget_mb)
        del logits, buffer
    return rows
