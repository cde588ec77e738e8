"""Regression tests for the hostile-input findings (issue 17), one per numbered item."""

import threading

import pytest
import torch

import ddiff
from ddiff._checks import eager


def test_sync_checks_is_per_thread():
    """Item 1: two threads that each turn the checks off, interleaved so that the first restores
    before the second, used to leave them off for the whole process."""
    entered, first_left = threading.Barrier(2), threading.Event()
    seen = {}

    def first():
        with ddiff.sync_checks(False):
            entered.wait()
        first_left.set()

    def second():
        with ddiff.sync_checks(False):
            entered.wait()
            first_left.wait()
            seen["inside"] = eager()
        seen["after"] = eager()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"inside": False, "after": True}
    assert eager()
    logits = torch.randn(2, 8)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="row 1"):
        ddiff.sample(logits, seed=0, backend="torch")


def test_sync_checks_off_in_a_thread_stays_in_that_thread():
    started, release = threading.Event(), threading.Event()

    def worker():
        with ddiff.sync_checks(False):
            started.set()
            release.wait()

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    try:
        assert eager()  # this thread's checks are untouched while the other has them off
    finally:
        release.set()
        t.join()


class _ClearedAfterEveryRead(dict):
    """A cache that another thread clears right after each read: the worst interleaving."""

    def __contains__(self, key):
        found = super().__contains__(key)
        self.clear()
        return found

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.clear()
        return value

    def get(self, key, default=None):
        value = super().get(key, default)
        self.clear()
        return value


def test_aranged_cache_survives_concurrent_clears(monkeypatch):
    """Item 18: the cache's check-insert-read was not atomic (a KeyError once in 80k threaded
    calls): a clear between the check and the read lost the entry."""
    from ddiff.torch_fast import sampling as fast

    monkeypatch.setattr(fast, "_ARANGES", _ClearedAfterEveryRead())
    for _ in range(3):
        assert torch.equal(fast.aranged(5, "cpu"), torch.arange(5))
        fast._ARANGES[(5, "cpu")] = torch.arange(5)  # present before the next read
    errors = []

    def hammer(base):
        try:
            for i in range(2000):
                assert fast.aranged(base + i % 97, "cpu").numel() == base + i % 97
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(b,)) for b in (1, 200, 400)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_anchor_attention_torch_ignores_nan_it_must_not_see():
    """Item 9: a NaN key or value at a position a block must not see left that block's output
    NaN on the torch backend (dense-mask SDPA: 0 * NaN). The blocks that see it still give NaN."""
    g = torch.Generator().manual_seed(0)
    B, H, D, S, bs = 1, 2, 16, 12, 4
    anchors = torch.tensor([[3, 12]])  # block 0 sees context 0..2, block 1 all of it
    q = torch.randn(B, H, 2 * bs, D, generator=g, requires_grad=True)
    k = torch.randn(B, H, S + 2 * bs, D, generator=g)
    v = torch.randn(B, H, S + 2 * bs, D, generator=g)
    run = lambda k, v: ddiff.anchor_attention(q, k, v, anchors, context_len=S, block_size=bs,  # noqa: E731
                                              backend="torch")
    from ddiff.reference.attention import anchor_attention_reference

    clean = anchor_attention_reference(q, k, v, anchors, context_len=S, block_size=bs)
    for name in ("k", "v"):
        for pos in (7, S + bs + 1):  # context after block 0's anchor; block 1's own noise
            bad_k, bad_v = k.clone(), v.clone()
            (bad_k if name == "k" else bad_v)[0, :, pos] = float("nan")
            out = run(bad_k, bad_v)
            assert torch.equal(out[0, :, :bs], clean[0, :, :bs]), (name, pos)  # block 0 never sees pos
            assert torch.isnan(out[0, :, bs:]).all(), (name, pos)  # block 1 sees it
            (dq,) = torch.autograd.grad(out[0, :, :bs].sum(), q)
            assert torch.isfinite(dq[0, :, :bs]).all(), (name, pos)  # block 0's queries get finite gradients
