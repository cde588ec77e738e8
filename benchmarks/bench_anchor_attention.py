"""anchor_attention (DFlash block-diagonal anchor attention): forward, backward and fwd+bwd.

Shapes: the DFlash Qwen3-8B drafter (B=1, Hq=32, Hkv=8, D=128, block_size=16, bf16) with N=512
blocks and S=4096 context tokens, and N=64 with S=2048 (where dense SDPA still fits). Anchors are
uniform in [0, S] and unsorted, so ~17% of the Q x KV grid is live at N=512.

Providers
* ``ddiff-triton``: ``anchor_attention(backend="triton")``.
* ``flex``: compiled FlexAttention with a prebuilt BlockMask; ``flex+mask-build`` adds the compiled
  ``create_block_mask`` time (anchors change every training step, so the mask is rebuilt every
  step); the build alone is its own row.
* ``sdpa-dense``: SDPA with the dense [B, 1, Q, KV] bool mask, where it fits.
* ``sdpa-flash-sol``: SDPA's flash backend, no mask, at the same Q length and a KV length equal
  to the mean number of live keys per query: the same live FLOPs with no sparsity (speed of light).

TFLOP/s count live FLOPs only: forward 4 * B * Hq * D * sum(live keys per query), backward 2.5x
that, fwd+bwd 3.5x. Targets (H100, checked here, never in tests): triton fwd+bwd >= 1.5x flex
including its mask build, >= 1.2x flex without it, and >= 50% of the speed-of-light TFLOP/s.
On CPU, at a tiny shape, ``ddiff-torch`` (``backend="torch"``) runs against ``sdpa-dense`` and,
forward only, eager ``flex``. Where ``benchmarks/results/kernel-cost-sm90.json``
costs the shape, the ddiff-triton rows carry the static bound (``static_bound_ms``) and the
measured time over it.
"""

from __future__ import annotations

import warnings

import torch

from benchmarks.common import peak_extra_mb, provider_unavailable, time_ms

OP = "anchor_attention"
PHASES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TARGET_VS_FLEX_WITH_BUILD = 1.5
TARGET_VS_FLEX = 1.2
TARGET_PCT_SOL = 50.0


def _shapes(device: str, quick: bool):
    if device != "cuda":
        return [dict(B=1, Hq=4, Hkv=2, D=64, S=128, N=8, bs=16, dtype=torch.float32)]
    drafter = dict(B=1, Hq=32, Hkv=8, D=128, bs=16, dtype=torch.bfloat16)
    shapes = [dict(drafter, S=2048, N=64), dict(drafter, S=4096, N=512)]
    if not quick:
        shapes.append(dict(drafter, B=2, S=4096, N=256))
    return shapes


def _label(s) -> str:
    dt = str(s["dtype"]).replace("torch.", "")
    return f"B{s['B']} Hq{s['Hq']}/{s['Hkv']} D{s['D']} S{s['S']} N{s['N']}x{s['bs']} {dt}"


def _inputs(s, device):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, S, N, bs = (s[k] for k in ("B", "Hq", "Hkv", "D", "S", "N", "bs"))
    anchors = torch.randint(0, S + 1, (B, N), generator=g).to(device)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device, s["dtype"])  # noqa: E731
    q, k, v = mk(B, Hq, N * bs, D), mk(B, Hkv, S + N * bs, D), mk(B, Hkv, S + N * bs, D)
    do = mk(B, Hq, N * bs, D)
    live_keys = (anchors.double() + bs).sum().item() * bs  # summed over query rows, per batch*head
    return q, k, v, do, anchors, live_keys


def _phase_fns(forward, q, k, v, do):
    """Callables for the three phases of ``forward(q, k, v) -> out``."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return forward(q, k, v)

    out = forward(qg, kg, vg)

    def bwd():
        return torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)

    def fwd_bwd():
        o = forward(qg, kg, vg)
        return torch.autograd.grad(o, (qg, kg, vg), do)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _measure(provider, label, forward, q, k, v, do, device, flops_fwd, extra_ms=0.0, fns=None):
    rows = []
    fns = fns or _phase_fns(forward, q, k, v, do)
    for phase in PHASES:
        fn = fns[phase]
        ms = time_ms(fn, device) + extra_ms
        rows.append({"op": f"{OP} {phase}", "shape": label, "provider": provider, "ms": ms,
                     "tflops": FLOP_FACTOR[phase] * flops_fwd / (ms * 1e-3) / 1e12,
                     "peak_mb": peak_extra_mb(fn, device)})
    return rows


def _unavailable_rows(label, providers, why):
    return [provider_unavailable(f"{OP} {phase}", label, p, why) for p in providers for phase in PHASES]


def _run_cpu(s):
    """CPU: ddiff's torch backend against SDPA with the dense mask and eager FlexAttention (forward
    only: FlexAttention has no CPU backward), at a tiny shape."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask

    from ddiff.ops import anchor_attention
    from ddiff.ops.attention import _flex_apply
    from ddiff.reference.attention import anchor_attention_mask, anchor_mask_mod

    label = _label(s)
    B, S, N, bs, D = (s[k] for k in ("B", "S", "N", "bs", "D"))
    q, k, v, do, anchors, live = _inputs(s, "cpu")
    flops = 4.0 * B * s["Hq"] * D * live
    fwd = lambda q, k, v: anchor_attention(q, k, v, anchors, context_len=S, block_size=bs,  # noqa: E731
                                           backend="torch")
    rows = _measure("ddiff-torch", label, fwd, q, k, v, do, "cpu", flops)
    mask = anchor_attention_mask(anchors, S, bs)[:, None]
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    rows += _measure("sdpa-dense", label, dense, q, k, v, do, "cpu", flops)

    Lq, Lk = N * bs, S + N * bs
    make_mask = lambda: create_block_mask(anchor_mask_mod(anchors, S, bs), B, None, Lq, Lk, device="cpu")  # noqa: E731
    block_mask = make_mask()
    build_ms = time_ms(make_mask, "cpu")
    with torch.no_grad():
        flex_ms = time_ms(lambda: _flex_apply(q, k, v, block_mask, D**-0.5, None, bs), "cpu")
    for provider, ms in (("flex", flex_ms), ("flex+mask-build", flex_ms + build_ms)):
        rows.append({"op": f"{OP} fwd", "shape": label, "provider": provider, "ms": ms,
                     "tflops": flops / (ms * 1e-3) / 1e12})
        no_backward = f"FlexAttention has no backward on CPU (torch {torch.__version__.split('+')[0]})"
        rows += [provider_unavailable(f"{OP} {phase}", label, provider, no_backward) for phase in PHASES[1:]]
    rows += _unavailable_rows(label, ("ddiff-triton",), "needs a CUDA device")
    rows += _unavailable_rows(label, ("sdpa-flash-sol",), "needs a CUDA device (SDPA's flash backend)")
    return rows


def _static_bounds_ms(label):
    """Per phase, the static lower bound of the Triton kernels' time at this shape, from
    ``benchmarks/results/kernel-cost-sm90.json`` (``python -m benchmarks.kernel_cost``), for the
    part this GPU is closest to; None when the table lacks the shape."""
    from benchmarks.kernel_cost import static_bounds

    machine = "H200" if "H200" in torch.cuda.get_device_name() else "H100 SXM"
    b = static_bounds(f"{OP} fwd+bwd {label}", machine)
    if b is None:
        return None
    fwd = b.get("anchor_attention:_anchor_attn_fwd", 0.0)
    bwd = sum(b.get(f"anchor_attention:{k}", 0.0) for k in ("_anchor_attn_bwd_preprocess", "_anchor_attn_bwd_dkdv",
                                                             "_anchor_attn_bwd_dq"))
    return {"fwd": fwd * 1e3, "bwd": bwd * 1e3, "fwd+bwd": (fwd + bwd) * 1e3}


def _try(fn):
    """Run a provider; on failure (out of memory, no kernel for the shape) return the reason."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        why = "out of memory"
    except Exception as e:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
        why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, why


def _run_cuda(s, device="cuda"):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ddiff.ops import anchor_attention
    from ddiff.ops.attention import _compiled_create_block_mask, _flex_apply
    from ddiff.reference.attention import anchor_attention_mask, anchor_mask_mod

    label = _label(s)
    B, Hq, Hkv, D, S, N, bs = (s[k] for k in ("B", "Hq", "Hkv", "D", "S", "N", "bs"))
    q, k, v, do, anchors, live = _inputs(s, device)
    Lq, Lk = N * bs, S + N * bs
    flops = 4.0 * B * Hq * D * live
    mean_live = live / (B * Lq)
    rows = []

    # ddiff-triton
    triton_fwd = lambda q, k, v: anchor_attention(q, k, v, anchors, context_len=S, block_size=bs,  # noqa: E731
                                                  backend="triton")
    rows += _measure("ddiff-triton", label, triton_fwd, q, k, v, do, device, flops)

    # flex: compiled create_block_mask (timed on its own) + compiled flex_attention
    def flex():
        build = _compiled_create_block_mask()
        mask_mod = anchor_mask_mod(anchors, S, bs)
        make_mask = lambda: build(mask_mod, B, None, Lq, Lk, device=device)  # noqa: E731
        block_mask = make_mask()
        build_ms = time_ms(make_mask, device)
        out = [{"op": f"{OP} mask build", "shape": label, "provider": "flex create_block_mask (compiled)",
                "ms": build_ms, "peak_mb": peak_extra_mb(make_mask, device)}]
        flex_fwd = lambda q, k, v: _flex_apply(q, k, v, block_mask, D**-0.5, None, bs)  # noqa: E731
        flex_rows = _measure("flex", label, flex_fwd, q, k, v, do, device, flops)
        out += flex_rows
        for r in flex_rows:
            ms = r["ms"] + build_ms
            phase = r["op"].split(" ", 1)[1]
            out.append(dict(r, provider="flex+mask-build", ms=ms,
                            tflops=FLOP_FACTOR[phase] * flops / (ms * 1e-3) / 1e12))
        with torch.no_grad():  # sanity: triton and flex agree
            diff = (triton_fwd(q, k, v).float() - flex_fwd(q, k, v).float()).abs().max().item()
        return out, diff

    flex_out, why = _try(flex)
    diff = None
    if flex_out is None:
        rows += _unavailable_rows(label, ("flex", "flex+mask-build"), why)
    else:
        rows += flex_out[0]
        diff = flex_out[1]

    # SDPA with the dense mask, where it fits.
    def dense():
        mask = anchor_attention_mask(anchors, S, bs)[:, None]
        fwd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
        return _measure("sdpa-dense", label, fwd, q, k, v, do, device, flops)

    dense_rows, why = _try(dense)
    rows += dense_rows if dense_rows is not None else _unavailable_rows(label, ("sdpa-dense",), why)
    torch.cuda.empty_cache()

    # Speed of light: flash SDPA, no mask, KV length = mean live keys per query, same live FLOPs.
    l_sol = max(1, round(mean_live))
    g = torch.Generator().manual_seed(1)
    ks = torch.randn(B, Hq, l_sol, D, generator=g).to(device, s["dtype"])
    vs = torch.randn(B, Hq, l_sol, D, generator=g).to(device, s["dtype"])

    def sol(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    sol_flops = 4.0 * B * Hq * D * Lq * l_sol
    sol_rows, why = _try(lambda: _measure(f"sdpa-flash-sol (KV={l_sol})", label, sol, q, ks, vs, do, device,
                                          sol_flops))
    rows += sol_rows if sol_rows is not None else _unavailable_rows(label, ("sdpa-flash-sol",), why)
    del ks, vs

    # Speedups and targets.
    by = {(r["provider"].split(" (")[0], r["op"]): r for r in rows if r.get("ms") is not None}
    static = _static_bounds_ms(label)
    for phase in PHASES:
        op = f"{OP} {phase}"
        t = by[("ddiff-triton", op)]
        if static is not None:  # how far the measurement is from the compiled code's static bound
            t["static_bound_ms"] = static[phase]
            t["measured_over_static"] = t["ms"] / static[phase]
        flex_row, flex_build_row, sol_row = (by.get((p, op)) for p in ("flex", "flex+mask-build", "sdpa-flash-sol"))
        if flex_row is not None:
            for r in rows:
                if r["op"] == op and r.get("ms") is not None:
                    r["speedup"] = flex_row["ms"] / r["ms"]  # vs flex without its mask build
        t["vs_flex"] = None if flex_row is None else flex_row["ms"] / t["ms"]
        t["vs_flex_with_build"] = None if flex_build_row is None else flex_build_row["ms"] / t["ms"]
        t["pct_sol_tflops"] = None if sol_row is None else 100.0 * t["tflops"] / sol_row["tflops"]
        t["max_abs_diff_vs_flex"] = diff
        if phase == "fwd+bwd":
            fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
            checks = ((t["vs_flex_with_build"], TARGET_VS_FLEX_WITH_BUILD), (t["vs_flex"], TARGET_VS_FLEX),
                      (t["pct_sol_tflops"], TARGET_PCT_SOL))
            t["target_met"] = all(got is not None and got >= want for got, want in checks)
            t["note"] = (f"targets: >= {TARGET_VS_FLEX_WITH_BUILD}x flex+build "
                         f"(got {fmt(t['vs_flex_with_build'], '.2f')}), "
                         f">= {TARGET_VS_FLEX}x flex (got {fmt(t['vs_flex'], '.2f')}), >= {TARGET_PCT_SOL:.0f}% of "
                         f"SOL TFLOP/s (got {fmt(t['pct_sol_tflops'], '.0f')}%)")
    return rows


def run(args) -> list[dict]:
    device = getattr(args, "device", "cuda" if torch.cuda.is_available() else "cpu")
    quick = getattr(args, "quick", True)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in _shapes(device, quick):
            rows += _run_cuda(s) if device == "cuda" else _run_cpu(s)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows
