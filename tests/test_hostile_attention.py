"""Hostile inputs for ``anchor_attention`` on the triton backend (issue 17 item 9, triton half).

A NaN key or value at a position a block must not see must not reach that block: not its output,
not its gradients (the torch half is in ``test_hostile_inputs.py``). Inside a key tile that a query
tile only partly sees, the kernels multiply zero weights by the invisible values (``0 * NaN``);
they now zero the non-finite entries there and flag the rows that do see one (NaN output).
"""

from __future__ import annotations

import pytest
import torch

import ddiff
from ddiff.reference.attention import anchor_attention_reference

T, F = True, False
# The interpreter runs the kernels' products in NumPy, which warns about the NaN it multiplies.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _inputs(D, S, bs, n_blocks, Hq=2, Hkv=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, n_blocks * bs, D, generator=g)
    k = torch.randn(1, Hkv, S + n_blocks * bs, D, generator=g)
    v = torch.randn(1, Hkv, S + n_blocks * bs, D, generator=g)
    return q, k, v


# block_size 4: the noise blocks take the masked 2-D walk; 16: the batched (NOISE_3D) products.
@pytest.mark.parametrize("bs", [4, 16])
def test_anchor_attention_triton_ignores_nan_it_must_not_see(bs, one_torch_thread):
    """Item 9: block 0 (anchor 3) must not see context position 7 nor block 1's noise; block 1
    (anchor 12) sees both. A NaN key or value there: block 0's output is the clean one and its
    queries get finite gradients; block 1's output is NaN."""
    D, S = 16, 12
    anchors = torch.tensor([[3, 12]])
    q, k, v = _inputs(D, S, bs, 2)
    clean = anchor_attention_reference(q, k, v, anchors, context_len=S, block_size=bs)
    for name in ("k", "v"):
        for pos in (7, S + bs + 1):  # context after block 0's anchor; block 1's own noise
            bad_k, bad_v = k.clone(), v.clone()
            (bad_k if name == "k" else bad_v)[0, :, pos] = float("nan")
            qg = q.clone().requires_grad_(True)
            out = ddiff.anchor_attention(qg, bad_k, bad_v, anchors, context_len=S, block_size=bs,
                                         backend="triton")
            torch.testing.assert_close(out[0, :, :bs], clean[0, :, :bs], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} {pos}: {m}")
            assert torch.isnan(out[0, :, bs:]).all(), (name, pos)  # block 1 sees it
            (dq,) = torch.autograd.grad(out[0, :, :bs].sum(), qg)
            assert torch.isfinite(dq[0, :, :bs]).all(), (name, pos)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_anchor_attention_nan_gradients_stay_where_they_are_seen(backend, one_torch_thread):
    """Item 9, gradients: context position 7 holds a NaN key or a NaN / inf value that only block 1
    (anchor 8) sees, so block 1's output is NaN (an inf value gives NaN on triton). Keys no kept
    block sees (context 8..11, the dropped block 2's noise) get exactly zero dk/dv; block 0's own
    noise keys get the gradients of a clean run, and block 0's queries finite ones; the dropped
    block's queries exactly zero."""
    D, S, bs = 16, 12, 4
    anchors = torch.tensor([[3, 8, 10]])
    keep = torch.tensor([[T, T, F]])
    q, k, v = _inputs(D, S, bs, 3)
    own0 = slice(S, S + bs)
    unseen = list(range(8, S)) + list(range(S + 2 * bs, S + 3 * bs))

    def grads(k, v):
        q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = ddiff.anchor_attention(q_, k_, v_, anchors, context_len=S, block_size=bs, keep=keep,
                                     backend=backend)
        return (out, *torch.autograd.grad(out, (q_, k_, v_), torch.ones_like(out)))

    _, _, dk_clean, dv_clean = grads(k, v)
    for name, value in (("k", float("nan")), ("v", float("nan")), ("v", float("inf"))):
        bad_k, bad_v = k.clone(), v.clone()
        (bad_k if name == "k" else bad_v)[0, :, 7, 3] = value
        out, dq, dk, dv = grads(bad_k, bad_v)
        if backend == "triton":
            assert torch.isnan(out[0, :, bs:2 * bs]).all(), name
        else:  # SDPA over the keys block 1 sees: NaN, or inf where only an inf value reaches
            assert (~torch.isfinite(out[0, :, bs:2 * bs])).any(-1).all(), name
        assert torch.isfinite(out[0, :, :bs]).all() and not out[0, :, 2 * bs:].any(), name
        assert torch.isfinite(dq[0, :, :bs]).all(), name
        assert not dq[0, :, 2 * bs:].any() and not torch.isnan(dq[0, :, 2 * bs:]).any(), name
        for grad, grad_clean in ((dk, dk_clean), (dv, dv_clean)):
            g_unseen = grad[0, :, unseen]
            assert torch.equal(g_unseen, torch.zeros_like(g_unseen)), name  # exactly 0, not NaN
            torch.testing.assert_close(grad[0, :, own0], grad_clean[0, :, own0], atol=1e-5, rtol=1e-5)
