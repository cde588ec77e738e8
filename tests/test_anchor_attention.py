"""ddiff.ops.anchor_attention: the rule, the reference, the Triton kernels and the flex path.

CPU runs the Triton kernels under TRITON_INTERPRET=1 (conftest.py) at small shapes; these tests
carry the correctness proof. Tolerances (max abs error against a float64 reference, plus rtol):

* float32: atol 1e-5, rtol 1e-5 (output and gradients).
* float16: atol 4e-3, rtol 4e-3; bfloat16: atol 3.2e-2, rtol 3.2e-2 (about 4 ulp at 1.0). The torch
  path at the same dtype has errors of the same order (checked in ``test_triton_half_precision``).
* float32 with logits of several hundred: 1e-5 relative to each tensor's largest entry.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ddiff.ops import anchor_attention, anchor_mask_mod
from ddiff.reference.attention import (
    anchor_attention_explicit,
    anchor_attention_mask,
    anchor_attention_reference,
)

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3.2e-2, rtol=3.2e-2),
}

T, F = True, False

# name -> (B, Hq, Hkv, D, context_len, block_size, anchors, keep, tiles)
CASES = {
    "sorted_gqa": (2, 4, 2, 32, 37, 8, [[0, 9, 20, 37], [3, 3, 30, 31]], None, None),
    "unsorted_repeated": (2, 2, 2, 64, 40, 8, [[30, 5, 30, 0, 12], [40, 40, 3, 3, 17]], None, None),
    "keep_mqa_bs16": (2, 4, 1, 32, 29, 16, [[29, 4, 0, 17], [11, 29, 29, 2]], [[T, F, T, T], [F, T, T, F]], None),
    "empty_context": (1, 2, 1, 32, 0, 16, [[0, 0, 0]], [[T, F, T]], None),
    "all_dropped": (1, 2, 2, 32, 24, 8, [[3, 24, 10]], [[F, F, F]], None),
    "d128": (1, 2, 1, 128, 33, 16, [[33, 7]], None, None),
    # Block bigger than the 16-row query tile, and 16-wide key tiles.
    "bs32_over_tile": (1, 2, 1, 32, 45, 32, [[45, 0, 20]], None, (16, 16, 16, 16, 16, 16)),
    # One 64-row query tile spans 8 blocks, with padding rows (N*bs = 40 < 64).
    "wide_query_tile": (2, 2, 1, 32, 50, 8, [[50, 1, 33, 33, 16], [0, 49, 48, 2, 25]], None,
                        (64, 16, 64, 16, 64, 16)),
    # block_size 12: blocks straddle query and key tiles.
    "block_size_12": (1, 2, 2, 32, 30, 12, [[7, 30, 0, 19]], [[T, T, T, F]], None),
    # 20 blocks, anchors searched 16 at a time (two chunks), D=16.
    "many_blocks": (1, 2, 1, 16, 64, 8, "random20", "random20", (32, 32, 16, 32, 32, 16, 16)),
}


def _case_tensors(name, dtype, device, seed=0):
    B, Hq, Hkv, D, S, bs, anchors, keep, tiles = CASES[name]
    g = torch.Generator().manual_seed(seed)
    if anchors == "random20":
        anchors = torch.randint(0, S + 1, (B, 20), generator=g).tolist()
        keep = (torch.rand(B, 20, generator=g) > 0.2).tolist()
    anchors = torch.tensor(anchors, dtype=torch.int64)
    N = anchors.shape[1]
    q = torch.randn(B, Hq, N * bs, D, generator=g)
    k = torch.randn(B, Hkv, S + N * bs, D, generator=g)
    v = torch.randn(B, Hkv, S + N * bs, D, generator=g)
    do = torch.randn(B, Hq, N * bs, D, generator=g)
    keep = None if keep is None else torch.tensor(keep, dtype=torch.bool)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q=q.to(device, dtype), k=k.to(device, dtype), v=v.to(device, dtype), do=do.to(device, dtype),
                anchors=to(anchors), keep=to(keep), S=S, bs=bs, tiles=tiles)


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def _run(backend, c, q=None, k=None, v=None, do=None, tiles=None):
    q, k, v, do = (c[n] if t is None else t for n, t in (("q", q), ("k", k), ("v", v), ("do", do)))

    def fn(q, k, v):
        if backend == "triton" and tiles is not None:
            from ddiff.ops.attention import triton_anchor_attention

            return triton_anchor_attention(q, k, v, c["anchors"], c["keep"], c["S"], c["bs"], q.shape[-1] ** -0.5,
                                           tiles)
        return anchor_attention(q, k, v, c["anchors"], context_len=c["S"], block_size=c["bs"], keep=c["keep"],
                                backend=backend)

    return _fwd_bwd(fn, q, k, v, do)


def _reference64(c):
    """Forward and gradients of the dense-mask reference in float64."""
    c64 = dict(c)
    return _run("torch", c64, *(c[n].double() for n in ("q", "k", "v", "do")))


def _assert_close(got, want, dtype, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(g).any(), f"{what}: NaN in {name}"
        torch.testing.assert_close(g.double(), w.double(), **TOL[dtype], msg=lambda m: f"{what} {name}: {m}")


# ---------------------------------------------------------------------------------------------
# The rule and the reference
# ---------------------------------------------------------------------------------------------


def test_mask_rule_by_hand():
    # context_len 3, block_size 2: block 0 (anchor 0) sees only keys 3, 4; block 1 (anchor 3) sees
    # keys 0, 1, 2 and 5, 6; block 2 (anchor 1, dropped) sees nothing.
    m = anchor_attention_mask(torch.tensor([[0, 3, 1]]), 3, 2, torch.tensor([[T, T, F]]))
    want = torch.zeros(1, 6, 9, dtype=torch.bool)
    want[0, 0:2, 3:5] = True
    want[0, 2:4, 0:3] = True
    want[0, 2:4, 5:7] = True
    assert torch.equal(m, want)


def test_mask_mod_matches_dense_mask():
    anchors = torch.tensor([[5, 0, 9, 5], [9, 9, 1, 3]])
    keep = torch.tensor([[T, T, F, T], [T, F, T, T]])
    S, bs = 9, 4
    mm = anchor_mask_mod(anchors, S, bs, keep)
    b = torch.arange(2)[:, None, None]
    qi = torch.arange(16)[None, :, None]
    kv = torch.arange(S + 16)[None, None, :]
    got = mm(b, torch.zeros_like(b), qi, kv)
    assert torch.equal(got.expand(2, 16, S + 16), anchor_attention_mask(anchors, S, bs, keep))


def test_reference_sdpa_matches_explicit_math():
    c = _case_tensors("keep_mqa_bs16", torch.float64, "cpu")
    kw = dict(context_len=c["S"], block_size=c["bs"], keep=c["keep"])
    qkvd = (c["q"], c["k"], c["v"], c["do"])
    a = _fwd_bwd(lambda q, k, v: anchor_attention_reference(q, k, v, c["anchors"], **kw), *qkvd)
    b = _fwd_bwd(lambda q, k, v: anchor_attention_explicit(q, k, v, c["anchors"], **kw), *qkvd)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)


def test_reference_ignores_invisible_keys():
    # Changing a key the block must not see (context at/after its anchor, another block's noise)
    # leaves that block's output unchanged; changing a visible one does not.
    c = _case_tensors("unsorted_repeated", torch.float64, "cpu")
    S, bs = c["S"], c["bs"]
    run = lambda k: anchor_attention(c["q"], k, c["v"], c["anchors"], context_len=S, block_size=bs)  # noqa: E731
    base = run(c["k"])
    blk = 1  # batch 0, anchor 5
    rows = slice(blk * bs, (blk + 1) * bs)
    for pos, visible in ((5, False), (4, True), (S + 2 * bs, False), (S + blk * bs + 3, True)):
        k2 = c["k"].clone()
        k2[0, :, pos] += 1.0
        changed = not torch.equal(run(k2)[0, :, rows], base[0, :, rows])
        assert changed == visible, (pos, visible)


def test_gradcheck_torch_path_float64():
    g = torch.Generator().manual_seed(1)
    anchors = torch.tensor([[5, 0, 2]])
    keep = torch.tensor([[T, T, F]])
    S, bs, D = 5, 2, 16
    q = torch.randn(1, 2, 3 * bs, D, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(1, 1, S + 3 * bs, D, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(1, 1, S + 3 * bs, D, dtype=torch.float64, generator=g).requires_grad_()
    fn = lambda q, k, v: anchor_attention(q, k, v, anchors, context_len=S, block_size=bs, keep=keep,  # noqa: E731
                                          backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_auto_is_torch_on_cpu_and_int32_anchors():
    c = _case_tensors("sorted_gqa", torch.float32, "cpu")
    kw = dict(context_len=c["S"], block_size=c["bs"])
    from ddiff.reference.attention import anchor_attention_dense

    want = anchor_attention_dense(c["q"], c["k"], c["v"], c["anchors"], **kw)  # finite k, v: the dense path
    assert torch.equal(anchor_attention(c["q"], c["k"], c["v"], c["anchors"], **kw), want)
    assert torch.equal(anchor_attention(c["q"], c["k"], c["v"], c["anchors"].int(), backend="torch", **kw), want)


# ---------------------------------------------------------------------------------------------
# Triton kernels against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_fp32(name, device):
    c = _case_tensors(name, torch.float32, device)
    got = _run("triton", c, tiles=c["tiles"])
    _assert_close(got, _reference64(c), torch.float32, name)


@pytest.mark.parametrize("name", ["keep_mqa_bs16", "empty_context"])
def test_triton_noise_block_paths_agree(name, device, monkeypatch):
    # Blocks of a power of two >= 16 rows that tile evenly run their noise part as one batched
    # product; other block sizes take the masked 2-D walk over the noise keys. Forcing the walk on
    # the same inputs gives the same result, and both match the reference.
    from ddiff.kernels import anchor_attention as kernels

    c = _case_tensors(name, torch.float32, device)
    assert kernels._noise_3d(c["bs"], 32) and not kernels._noise_3d(8, 32) and not kernels._noise_3d(32, 16)
    want = _reference64(c)
    batched = _run("triton", c)
    monkeypatch.setattr(kernels, "_noise_3d", lambda block_size, tile: False)
    walked = _run("triton", c)
    _assert_close(batched, want, torch.float32, f"{name} batched noise blocks")
    _assert_close(walked, want, torch.float32, f"{name} masked noise walk")
    for what, a, b in zip(("out", "dq", "dk", "dv"), batched, walked):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=lambda m: f"{name} {what}: {m}")


def test_triton_large_logits(device):
    # Scores of several hundred: the online softmax must rescale without overflow. fp32 rounding of
    # such scores is ~1e-5 relative, so the bound is relative to each tensor's largest entry, and
    # the kernel must do no worse than SDPA in fp32.
    c = _case_tensors("sorted_gqa", torch.float32, device)
    c["q"] = c["q"] * 12
    want = _reference64(c)
    for name, got, ref, sdpa in zip(("out", "dq", "dk", "dv"), _run("triton", c), want, _run("torch", c)):
        err = (got.double() - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), (name, err)
        assert err <= 1.5 * (sdpa.double() - ref).abs().max().item() + 1e-6, (name, err)


def test_triton_strided_inputs(device):
    # q/k/v as [B, L, H, D] transposed views; a loss of out.sum() gives a stride-0 gradient.
    c = _case_tensors("keep_mqa_bs16", torch.float32, device)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (c["q"], c["k"], c["v"]))
    assert not q.is_contiguous()
    do = torch.ones(()).to(device).expand_as(c["do"])
    _assert_close(_run("triton", c, q, k, v, do), _run("torch", c, *(t.double() for t in (q, k, v, do))),
                  torch.float32, "strided")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["unsorted_repeated", "keep_mqa_bs16"])
def test_triton_half_precision(name, dtype, device):
    c = _case_tensors(name, dtype, device)
    want = _reference64(c)
    got = _run("triton", c)
    _assert_close(got, want, dtype, f"{name} {dtype}")
    # The kernel is about as accurate as SDPA at the same dtype. Like FlashAttention it rounds P and
    # dS to the input dtype before the tensor-core products, which SDPA on CPU does not: with bf16's
    # 8-bit mantissa that alone roughly doubles the error (keeping P and dS in fp32 brings the kernel
    # to SDPA's level), hence the wider factor for bf16.
    factor = 2.5 if dtype == torch.float16 else 4.0
    torch_err = max((a.double() - b).abs().max().item() for a, b in zip(_run("torch", c), want))
    triton_err = max((a.double() - b).abs().max().item() for a, b in zip(got, want))
    assert triton_err <= factor * torch_err, (triton_err, torch_err)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropped_blocks_exact_zero_no_nan(backend, device):
    c = _case_tensors("keep_mqa_bs16", torch.float32, device)
    row_drop = ~c["keep"].repeat_interleave(c["bs"], dim=1)  # [B, Lq]
    # The upstream gradient of a dropped row is irrelevant, even NaN.
    c["do"] = torch.where(row_drop[:, None, :, None], torch.full_like(c["do"], float("nan")), c["do"])
    out, dq, dk, dv = _run(backend, c)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), name
    drop = row_drop[:, None, :, None].expand_as(out)
    assert torch.equal(out[drop], torch.zeros_like(out[drop]))
    assert torch.equal(dq[drop], torch.zeros_like(dq[drop]))
    # Nobody sees a dropped block's noise keys.
    S = c["S"]
    drop_kv = row_drop[:, None, :, None].expand(-1, dk.shape[1], -1, dk.shape[3])
    assert torch.equal(dk[:, :, S:][drop_kv], torch.zeros_like(dk[:, :, S:][drop_kv]))
    assert torch.equal(dv[:, :, S:][drop_kv], torch.zeros_like(dv[:, :, S:][drop_kv]))


def test_empty_batch_and_blocks(device):
    q = torch.randn(1, 2, 0, 32, device=device)
    k = torch.randn(1, 2, 7, 32, device=device)
    anchors = torch.zeros(1, 0, dtype=torch.int64, device=device)
    for backend in ("torch", "triton"):
        out = anchor_attention(q, k, k, anchors, context_len=7, block_size=16, backend=backend)
        assert out.shape == q.shape


# ---------------------------------------------------------------------------------------------
# FlexAttention path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sorted_gqa", "keep_mqa_bs16", "empty_context", "all_dropped"])
def test_flex_forward_matches_reference(name, device):
    c = _case_tensors(name, torch.float32, device)
    kw = dict(context_len=c["S"], block_size=c["bs"], keep=c["keep"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        got = anchor_attention(c["q"], c["k"], c["v"], c["anchors"], backend="flex", **kw)
    want = anchor_attention(c["q"].double(), c["k"].double(), c["v"].double(), c["anchors"], backend="torch", **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_flex_backward_matches_reference(device):
    if device == "cpu":
        pytest.skip(f"FlexAttention has no CPU backward (torch {torch.__version__} raises NotImplementedError)")
    c = _case_tensors("keep_mqa_bs16", torch.float32, device)
    _assert_close(_run("flex", c), _reference64(c), torch.float32, "flex")


# ---------------------------------------------------------------------------------------------
# Bad input: every check, on every backend
# ---------------------------------------------------------------------------------------------


def _valid():
    B, Hq, Hkv, D, S, N, bs = 2, 4, 2, 32, 10, 3, 4
    return dict(q=torch.randn(B, Hq, N * bs, D), k=torch.randn(B, Hkv, S + N * bs, D),
                v=torch.randn(B, Hkv, S + N * bs, D), anchors=torch.tensor([[0, 10, 4], [2, 2, 9]]),
                context_len=S, block_size=bs, keep=None, scale=None)


BAD = [
    ("q not a tensor", lambda a: a.update(q=[1.0]), TypeError, "`q`"),
    ("q 3-D", lambda a: a.update(q=a["q"][0]), ValueError, "`q` must be 4-D"),
    ("q integer", lambda a: a.update(q=a["q"].int()), TypeError, "`q` must be float"),
    ("k dtype mismatch", lambda a: a.update(k=a["k"].half()), TypeError, "`k` has dtype"),
    ("v shape mismatch", lambda a: a.update(v=a["v"][:, :, :-1]), ValueError, "`v` must have the shape"),
    ("k batch mismatch", lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), ValueError, "`k` has batch"),
    ("head dim mismatch", lambda a: a.update(k=a["k"][..., :16], v=a["v"][..., :16]), ValueError, "head dim"),
    ("head dim unsupported", lambda a: a.update(q=a["q"][..., :24], k=a["k"][..., :24], v=a["v"][..., :24]),
     ValueError, "D=24"),
    ("GQA heads", lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1, -1), v=a["v"][:, :1].expand(-1, 3, -1, -1)),
     ValueError, "multiple of"),
    ("q length", lambda a: a.update(q=a["q"][:, :, :-1]), ValueError, "N \\* block_size"),
    ("kv length", lambda a: a.update(k=a["k"][:, :, 1:], v=a["v"][:, :, 1:]), ValueError, "context_len \\+ N"),
    ("anchors not a tensor", lambda a: a.update(anchors=[[0, 1, 2]]), TypeError, "`anchors` must be a torch.Tensor"),
    ("anchors float", lambda a: a.update(anchors=a["anchors"].float()), TypeError, "`anchors` must be an integer"),
    ("anchors 1-D", lambda a: a.update(anchors=a["anchors"][0]), ValueError, "`anchors` must have shape"),
    ("anchors batch", lambda a: a.update(anchors=a["anchors"][:1]), ValueError, "`anchors` has batch"),
    ("anchors negative", lambda a: a["anchors"].__setitem__((0, 1), -1), ValueError, "`anchors` must lie in"),
    ("anchors > context_len", lambda a: a["anchors"].__setitem__((1, 2), 11), ValueError, "`anchors` must lie in"),
    ("keep not bool", lambda a: a.update(keep=torch.ones(2, 3)), TypeError, "`keep` must be a bool"),
    ("keep shape", lambda a: a.update(keep=torch.ones(2, 2, dtype=torch.bool)), ValueError, "`keep` must have"),
    ("context_len float", lambda a: a.update(context_len=10.0), TypeError, "`context_len` must be an int"),
    ("context_len negative", lambda a: a.update(context_len=-1), ValueError, "`context_len` must be >= 0"),
    ("block_size zero", lambda a: a.update(block_size=0), ValueError, "`block_size` must be >= 1"),
    ("scale string", lambda a: a.update(scale="0.1"), TypeError, "`scale`"),
    ("scale nan", lambda a: a.update(scale=float("nan")), TypeError, "`scale`"),
]


@pytest.mark.parametrize("backend", ["torch", "flex", "triton"])
@pytest.mark.parametrize("what,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, mutate, exc, match, backend):
    a = _valid()
    mutate(a)
    q, k, v, anchors = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("anchors")
    with pytest.raises(exc, match=match):
        anchor_attention(q, k, v, anchors, backend=backend, **a)


def test_bad_backend_and_dtype():
    a = _valid()
    q, k, v, anchors = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("anchors")
    with pytest.raises(ValueError, match="`backend`"):
        anchor_attention(q, k, v, anchors, backend="cuda", **a)
    with pytest.raises(TypeError, match="backend='triton' supports"):
        anchor_attention(q.double(), k.double(), v.double(), anchors, backend="triton", **a)
    with pytest.raises(ValueError, match="`anchors` must lie in"):
        anchor_mask_mod(torch.tensor([[0, 11]]), 10, 4)
    with pytest.raises(ValueError, match="`keep` must have"):
        anchor_mask_mod(torch.tensor([[0, 1]]), 10, 4, torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# GPU only: compiled kernels at larger sizes
# ---------------------------------------------------------------------------------------------


def _gpu_case(D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, S, N, bs = 2, 8, 2, 700, 40, 16
    anchors = torch.randint(0, S + 1, (B, N), generator=g)
    anchors[0, :3] = torch.tensor([0, S, S])
    keep = torch.rand(B, N, generator=g) > 0.1
    mk = lambda *s: torch.randn(*s, generator=g).cuda().to(dtype)  # noqa: E731
    return dict(q=mk(B, Hq, N * bs, D), k=mk(B, Hkv, S + N * bs, D), v=mk(B, Hkv, S + N * bs, D),
                do=mk(B, Hq, N * bs, D), anchors=anchors.cuda(), keep=keep.cuda(), S=S, bs=bs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_triton_matches_reference(D, dtype):
    c = _gpu_case(D, dtype)
    _assert_close(_run("triton", c), _reference64(c), dtype, f"cuda D={D} {dtype}")


@pytest.mark.cuda
def test_cuda_flex_matches_triton():
    c = _gpu_case(128, torch.bfloat16)
    want = _reference64(c)
    _assert_close(_run("flex", c), want, torch.bfloat16, "flex")
    _assert_close(_run("triton", c), want, torch.bfloat16, "triton")


@pytest.mark.cuda
def test_cuda_torch_compile():
    c = _gpu_case(128, torch.bfloat16)

    def fn(q, k, v):
        return anchor_attention(q, k, v, c["anchors"], context_len=c["S"], block_size=c["bs"], keep=c["keep"],
                                backend="triton")

    eager = _fwd_bwd(fn, c["q"], c["k"], c["v"], c["do"])
    compiled = _fwd_bwd(torch.compile(fn), c["q"], c["k"], c["v"], c["do"])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dense_path_equals_the_per_block_reference():
    """The torch backend's dense-mask fast path (finite keys and values) is the reference's rule."""
    from ddiff.reference.attention import anchor_attention_dense

    for name in ("sorted_gqa", "keep_mqa_bs16", "empty_context", "all_dropped"):
        c = _case_tensors(name, torch.float64, "cpu")
        kw = dict(context_len=c["S"], block_size=c["bs"], keep=c["keep"])
        a = _fwd_bwd(lambda q, k, v: anchor_attention_reference(q, k, v, c["anchors"], **kw), *(
            c[n] for n in ("q", "k", "v", "do")))
        b = _fwd_bwd(lambda q, k, v: anchor_attention_dense(q, k, v, c["anchors"], **kw), *(
            c[n] for n in ("q", "k", "v", "do")))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)
