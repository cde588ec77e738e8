"""Token diffusion sampling (MDLM absorbing step): time per step outside the model forward, peak memory.

Full shape (CUDA): 4 x 1024 tokens, 1024 steps, V = 50257 (GPT-2), logits from a 12-layer,
768-wide denoiser with random weights (bf16).

Rows
* ``mdlm_step_loop``: the whole 1024-step reverse loop on fixed logits (the forward taken out), per
  step: ``ddiff-triton`` / ``ddiff-torch`` (``TokenDiffusionScheduler.step`` -> ``ddiff.mdlm_step``),
  ``mdlm-reference`` (MDLM's ``_ddpm_caching_update``: fp32 SUBS log-softmax, a materialised
  ``q_xs = p_x0 * (move_t - move_s)`` with the mask column set to ``move_s``, and
  ``_sample_categorical``: Gumbel noise from ``rand_like`` and an argmax) and ``bd3lm-float64``
  (BD3LM's step: ``p_x0`` in float64, ``q_xs = p_x0 * (1 - move_s / move_t)``, float64 noise).
  The references are restated here from the papers' code paths (not imported). ``peak_mb`` is the
  memory a step allocates beyond the logits and the state (CUDA only).
* ``pipeline``: ``TokenDiffusionPipeline`` end to end with the denoiser (ddiff backends only):
  total time, NFE, ``forward_ms`` (mean time inside one model forward, measured by hooks on the
  model during that same run) and ``step_overhead_ms`` = (total - time inside the forwards) /
  steps: everything the pipeline adds per step, never negative.

On CPU (no triton) a scaled-down shape runs in quick mode (B=2, L=32, V=50257, 16 steps, a
2-layer 64-wide denoiser) and triton rows carry ``ms=None``.
"""

from __future__ import annotations

import time

import torch

import ddiff
from benchmarks.common import ForwardTimer, median_of_runs, peak_extra_mb, provider_unavailable, synchronize

OP_STEP = "mdlm_step_loop"
OP_PIPE = "pipeline"
VOCAB = 50257
MASK = VOCAB - 1  # GPT-2 has no mask token; MDLM appends one, here the last id stands in


def _shape(device: str, quick: bool):
    if device == "cuda":
        return dict(B=4, L=1024, V=VOCAB, steps=1024, layers=12, hidden=768, heads=12, dtype=torch.bfloat16)
    return dict(B=2, L=32, V=VOCAB, steps=16, layers=2, hidden=64, heads=4, dtype=torch.float32)


def _label(s) -> str:
    return f"B{s['B']} L{s['L']} V{s['V']} steps{s['steps']}"


# ---------------------------------------------------------------------------------------------
# Reference steps (the baselines' algorithms, restated)
# ---------------------------------------------------------------------------------------------


def _subs_log_probs(logits, x, mask_id, dtype):
    """MDLM's SUBS parameterisation: mask logit at -1e6, log-softmax, and unmasked rows one-hot."""
    logp = logits.to(dtype)
    logp[..., mask_id] += -1e6
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    unmasked = x != mask_id
    logp[unmasked] = -1e6
    logp[unmasked, x[unmasked]] = 0.0
    return logp


def _gumbel_argmax(probs):
    """``_sample_categorical``: probs / (-log U) argmax, U from rand_like in the probs' dtype."""
    gumbel_norm = 1e-10 - (torch.rand_like(probs) + 1e-10).log()
    return (probs / gumbel_norm).argmax(dim=-1)


def mdlm_reference_step(logits, x, mask_id, alpha_t, alpha_s):
    move_t, move_s = 1.0 - alpha_t, 1.0 - alpha_s
    p_x0 = _subs_log_probs(logits, x, mask_id, torch.float32).exp()
    q_xs = p_x0 * (move_t - move_s)
    q_xs[..., mask_id] = move_s
    x_new = _gumbel_argmax(q_xs)
    return torch.where(x != mask_id, x, x_new)


def bd3lm_float64_step(logits, x, mask_id, alpha_t, alpha_s):
    move_t, move_s = 1.0 - alpha_t, 1.0 - alpha_s
    mask_prob = move_s / move_t
    p_x0 = _subs_log_probs(logits, x, mask_id, torch.float64).exp()
    q_xs = p_x0 * (1.0 - mask_prob)
    q_xs[..., mask_id] = mask_prob
    x_new = _gumbel_argmax(q_xs)
    return torch.where(x != mask_id, x, x_new)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def _denoiser(s, device):
    from ddiff.denoiser import tiny_denoiser

    torch.manual_seed(0)
    model = tiny_denoiser(s["V"], hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"],
                          max_positions=max(2048, s["L"]))
    return model.to(device=device, dtype=s["dtype"]).eval()


def _step_loop(step_fn, logits, s, device, steps_run=None):
    """A function that runs the reverse loop of ``s['steps']`` steps on fixed logits (only the
    first ``steps_run`` of them when given)."""
    from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler

    sched = TokenDiffusionScheduler(s["V"], MASK)
    sched.set_timesteps(s["steps"])
    alphas = sched.alphas.tolist()
    x0 = torch.full((s["B"], s["L"]), MASK, dtype=torch.long, device=device)

    def run():
        x = x0
        for k in range(steps_run or s["steps"]):
            x = step_fn(logits, x, alphas[k], alphas[k + 1], k)
        return x

    return run


def run(args) -> list[dict]:
    device, quick = args.device, args.quick
    s = _shape(device, quick)
    shape = _label(s)
    rows = []
    model = _denoiser(s, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, s["V"] - 1, (s["B"], s["L"]), generator=g).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones(s["B"], 1, s["L"], s["L"], dtype=torch.bool,
                                                                device=device)).logits

    from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler

    sched = TokenDiffusionScheduler(s["V"], MASK)

    def ddiff_step(backend):
        return lambda lg, x, a_t, a_s, k: sched.step(lg, x, a_t, a_s, seed=0, offset=k, backend=backend)

    providers = {
        "ddiff-triton": ddiff_step("triton"),
        "ddiff-torch": ddiff_step("torch"),
        "mdlm-reference": lambda lg, x, a_t, a_s, k: mdlm_reference_step(lg, x, MASK, a_t, a_s),
        "bd3lm-float64": lambda lg, x, a_t, a_s, k: bd3lm_float64_step(lg, x, MASK, a_t, a_s),
    }
    baseline = None
    for name, step_fn in providers.items():
        if name == "ddiff-triton" and device != "cuda":
            rows.append(provider_unavailable(OP_STEP, shape, name, "needs a CUDA device"))
            continue
        # ddiff-torch's reference step costs the same at every step (it draws noise for every
        # row), so on CUDA it is timed over the first 64 steps only.
        steps_run = 64 if name == "ddiff-torch" and device == "cuda" else s["steps"]
        loop = _step_loop(step_fn, logits, s, device, steps_run)
        with torch.no_grad(), ddiff.sync_checks(False):  # as the pipeline runs the ops on CUDA
            loop()  # warm-up (compiles triton kernels)

            def timed_loop():
                synchronize(device)
                loop()
                synchronize(device)

            loop_ms, _ = median_of_runs(timed_loop, 3)
            per_step = loop_ms / steps_run
            peak = peak_extra_mb(loop, device)
        row = {"op": OP_STEP, "shape": shape, "provider": name, "ms": per_step, "peak_mb": peak,
               "note": f"per step, forward excluded (median of 3 loops of {steps_run} of {s['steps']} steps)"}
        if name == "mdlm-reference":
            baseline = per_step
        rows.append(row)
    for row in rows:
        if row["ms"] is not None and baseline:
            row["speedup"] = baseline / row["ms"]

    # End to end through the pipeline (ddiff backends). The forwards are timed inside the run
    # itself, so the overhead is what the pipeline adds to exactly those forwards.
    from ddiff.pipelines import TokenDiffusionPipeline

    timer = ForwardTimer(model, device)
    for backend in ("triton", "torch"):
        name = f"ddiff-{backend}"
        if backend == "triton" and device != "cuda":
            rows.append(provider_unavailable(OP_PIPE, shape, name, "needs a CUDA device"))
            continue
        pipe = TokenDiffusionPipeline(model, process="absorbing", mask_token_id=MASK, vocab_size=s["V"],
                                      backend=backend)

        def sample():
            timer.reset()
            synchronize(device)
            started = time.perf_counter()
            out = pipe(batch_size=s["B"], seq_len=s["L"], num_inference_steps=s["steps"], seed=0,
                       output_type="ids", progress=False)
            synchronize(device)
            total = (time.perf_counter() - started) * 1e3
            return total, timer.total_ms(), out.nfe

        sample()  # warm-up (Triton compilation, allocator)
        _, (total_ms, fwd_total_ms, nfe) = median_of_runs(sample, 1 if device == "cuda" and not quick else 3)
        overhead = (total_ms - fwd_total_ms) / s["steps"]
        fwd_ms = fwd_total_ms / max(nfe, 1)
        rows.append({"op": OP_PIPE, "shape": shape, "provider": name, "ms": total_ms, "nfe": nfe,
                     "forward_ms": fwd_ms, "step_overhead_ms": overhead,
                     "peak_mb": peak_extra_mb(sample, device) if backend == "triton" else None,
                     "note": f"total (median of runs); {s['layers']}x{s['hidden']} denoiser, nfe {nfe}, "
                             f"fwd {fwd_ms:.3g} ms, overhead/step {overhead:.3g} ms"})
    timer.remove()
    return rows
