"""The torch backend's fast path (``ddiff.torch_fast``) against ``ddiff.reference``, bit for bit on tokens.

Every case draws fresh random logits and compares the fast functions with the reference ones
on the same arguments: tokens, argmax, filter masks and posterior steps must be equal; the
confidences and probabilities agree to float rounding. The device code paths (no host reads,
the torch Philox) are exercised on CPU by switching the host reads off.
"""

from __future__ import annotations

import pytest
import torch

import ddiff
from ddiff.reference import decoding as ref_decoding
from ddiff.reference import rng as ref_rng
from ddiff.reference import sampling as ref_sampling
from ddiff.torch_fast import decoding as fast_decoding
from ddiff.torch_fast import rng as fast_rng
from ddiff.torch_fast import sampling as fast_sampling

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# V < 1024, exactly one tile, not a multiple of 1024, several tiles.
VOCABS = [1, 7, 300, 1024, 1500, 2600]


def _torch_philox(seed, offset, row, index, stream):
    index2d = index.reshape(1, -1) if index.dim() == 1 else index
    c2, c3 = fast_rng._counter_hi(offset, stream)
    return fast_rng._philox_torch(index2d & 0xFFFFFFFF, row.reshape(-1, 1) & 0xFFFFFFFF, c2, c3,
                                  fast_rng._keys_torch(seed, row.device))


@pytest.fixture(params=["host", "device"])
def host_reads(request, monkeypatch):
    """``"device"``: the fast path runs as on MPS / CUDA (no host reads, the torch Philox)."""
    if request.param == "device":
        monkeypatch.setattr(fast_sampling, "host_readable", lambda tensor: False)
        monkeypatch.setattr(fast_decoding, "host_readable", lambda tensor: False)
        monkeypatch.setattr(fast_rng, "philox_words", _torch_philox)
    return request.param


def _case(seed: int, rows: int, vocab: int, dtype, *, neg_inf=False, scale=None):
    gen = torch.Generator().manual_seed(seed)
    scale = float(torch.rand(1, generator=gen) * 4 + 0.5) if scale is None else scale
    x = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)
    if neg_inf and vocab > 3:
        x[:, : vocab // 3] = float("-inf")
    return x, gen


def _per_row(gen, rows, vocab, *, filters: bool, greedy: str):
    temp = torch.rand(rows, generator=gen) * 1.5 + 0.05
    if greedy == "mixed":
        temp[::3] = 0.0
    elif greedy == "all":
        temp.zero_()
    if not filters:
        return temp, torch.zeros(rows, dtype=torch.long), torch.ones(rows), torch.zeros(rows)
    top_k = torch.randint(0, vocab + 3, (rows,), generator=gen)
    top_k[::2] = 0
    top_p = torch.rand(rows, generator=gen) * 0.9 + 0.05
    top_p[1::3] = 1.0
    min_p = torch.rand(rows, generator=gen) * 0.2
    min_p[::2] = 0.0
    return temp, top_k, top_p, min_p


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,per_row_seed", [(-5, False), (2**62 + 7, True)])
def test_noise_is_bit_identical(seed, per_row_seed, host_reads):
    gen = torch.Generator().manual_seed(abs(seed) % 1000)
    rows, width = 3, 200
    row = torch.randint(0, 2**32, (rows,), generator=gen)
    index = torch.randint(0, 2**31, (rows, width), generator=gen)
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,), generator=gen) if per_row_seed else torch.full((rows,), seed)
    offset = 2**40 + 3
    for stream in (ref_rng.STREAM_TOKEN, ref_rng.STREAM_TILE, ref_rng.STREAM_POSTERIOR):
        fast_seed = seeds if per_row_seed else seed
        ref_u = ref_rng.philox_uniform(seeds[:, None], offset, row[:, None], index, stream)
        ref_g = ref_rng.philox_gumbel(seeds[:, None], offset, row[:, None], index, stream)
        assert torch.equal(fast_rng.uniform(fast_seed, offset, row, index, stream), ref_u)
        assert torch.equal(fast_rng.gumbel(fast_seed, offset, row, index, stream), ref_g)
    # A shared column index (the tile draws) and the series branch of -log(1 - u).
    rows_, cols_ = torch.arange(8), torch.arange(1024)
    u = ref_rng.philox_uniform(torch.tensor(seed), 3, rows_[:, None], cols_[None, :], 0)
    assert bool((u < ref_rng.SMALL_U).any())
    assert torch.equal(fast_rng.gumbel(seed, 3, rows_, cols_, 0),
                       ref_rng.philox_gumbel(torch.tensor(seed), 3, rows_[:, None], cols_[None, :], 0))


# ---------------------------------------------------------------------------------------------
# sample / filter_logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mode", ["inclusive", "bd3lm"])
def test_sample_and_filter_equal_the_reference(dtype, vocab, mode, host_reads):
    for case, (filters, greedy) in enumerate([(False, "none"), (True, "mixed"), (True, "none"), (False, "all")]):
        x, gen = _case(1000 * vocab + case, 6, vocab, dtype, neg_inf=case == 2)
        temp, top_k, top_p, min_p = _per_row(gen, 6, vocab, filters=filters, greedy=greedy)
        seeds = torch.randint(0, 2**62, (6,), generator=gen)
        ref_tokens, ref_probs = ref_sampling.sample_reference(x, temp, top_k, top_p, min_p, seeds, 11, top_p_mode=mode)
        tokens, probs, bad = fast_sampling.sample(x, (temp, 0.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0), (seeds, 0), 11,
                                                  top_p_mode=mode)
        assert torch.equal(tokens, ref_tokens)
        assert torch.allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
        assert not bool(bad.any())
        ref_filtered = ref_sampling.filter_logits_reference(x, top_k, top_p, min_p, mode)
        filtered, _ = fast_sampling.filter_logits(x, (top_k, 0), (top_p, 1.0), (min_p, 0.0), mode)
        assert torch.equal(filtered, ref_filtered)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 50, 0.9, 0.0), (1.3, 0, 0.8, 0.0), (0.9, 0, 1.0, 0.05),
    (0.8, 5, 1.0, 0.1), (1.0, 1, 0.5, 0.0),
])
def test_scalar_parameters_and_int_seed(temperature, top_k, top_p, min_p):
    # The ops pass scalars as python values: the fast path keeps them on the host.
    for vocab, dtype in [(33000, torch.bfloat16), (2100, torch.float32), (900, torch.float16)]:
        x, _ = _case(vocab, 3, vocab, dtype, scale=3.0)
        full = lambda v, dt: torch.full((3,), v, dtype=dt)  # noqa: E731
        seed = -(2**61) - 17
        ref_tokens, ref_probs = ref_sampling.sample_reference(
            x, full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
            full(min_p, torch.float32), full(seed, torch.int64), 4)
        tokens, probs, _ = fast_sampling.sample(x, (None, temperature), (None, top_k), (None, top_p), (None, min_p),
                                                (None, seed), 4)
        assert torch.equal(tokens, ref_tokens)
        assert torch.allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)


def test_bf16_ties_at_the_top_k_boundary():
    # bf16 logits tie often: every token tied with the k-th is kept, and top-p sees all of them.
    x = torch.randint(-8, 8, (4, 3000)).to(torch.bfloat16) * 0.5
    for top_k, top_p in [(10, 1.0), (10, 0.6), (200, 0.95), (2999, 0.3)]:
        ref = ref_sampling.filter_logits_reference(x, torch.full((4,), top_k), torch.full((4,), top_p), torch.zeros(4))
        out, _ = fast_sampling.filter_logits(x, (None, top_k), (None, top_p), (None, 0.0))
        assert torch.equal(out, ref)


def test_invalid_rows_are_flagged_like_the_reference():
    x, _ = _case(5, 5, 1500, torch.float32)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    x[3] = float("-inf")
    x[4, 9] = 3e38  # finite, but +inf once divided by the temperature
    temp = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.5])
    _, _, bad = fast_sampling.sample(x, (temp, 0.0), (None, 0), (None, 1.0), (None, 0.0), (None, 1), 0)
    assert torch.equal(bad, ref_sampling.invalid_rows(x, temp))


def test_empty_batch():
    tokens, probs, bad = fast_sampling.sample(torch.empty(0, 40), (None, 1.0), (None, 0), (None, 1.0), (None, 0.0),
                                              (None, 0), 0)
    assert tokens.shape == probs.shape == bad.shape == (0,)
    tokens, conf, argmax, bad = fast_decoding.predict_tokens(
        torch.empty(0, 40), None, None, (None, 0.0), (None, 0), (None, 1.0), (None, 0.0), (None, 0), 0,
        confidence="prob", confidence_from="raw", return_argmax=True)
    assert tokens.shape == conf.shape == argmax.shape == (0,)


# ---------------------------------------------------------------------------------------------
# predict_tokens / mdlm_step / udlm_step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prob", "margin", "neg_entropy", "random"])
@pytest.mark.parametrize("confidence_from", ["raw", "sampling"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_tokens_equals_the_reference(kind, confidence_from, dtype, host_reads):
    for case, vocab in enumerate([3, 70, 1024, 2100]):
        x, gen = _case(7 * case + len(kind), 8, vocab, dtype)
        mask = torch.rand(8, generator=gen) < 0.7 if case % 2 else None
        temp, top_k, top_p, min_p = _per_row(gen, 8, vocab, filters=case >= 2, greedy=["mixed", "none", "all"][case % 3])
        seeds = torch.randint(0, 2**62, (8,), generator=gen)
        suppress = torch.tensor([0, vocab - 1]) if vocab > 2 else None
        conf_suppress = torch.tensor([1]) if case == 3 else None
        mode = "bd3lm" if case == 2 else "inclusive"
        ref = ref_decoding.predict_tokens_reference(
            x, mask, temp, top_k, top_p, min_p, seeds, 4, confidence=kind, confidence_from=confidence_from,
            suppress_ids=suppress, top_p_mode=mode, confidence_suppress_ids=conf_suppress, return_argmax=True)
        tokens, conf, argmax, bad = fast_decoding.predict_tokens(
            x, mask, suppress, (temp, 0.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0), (seeds, 0), 4, confidence=kind,
            confidence_from=confidence_from, top_p_mode=mode, confidence_suppress=conf_suppress, return_argmax=True)
        assert torch.equal(tokens, ref[0]) and torch.equal(argmax, ref[2])
        assert torch.allclose(conf, ref[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(bad, ref_decoding.masked_invalid_rows(x, mask, temp, suppress))


@pytest.mark.parametrize("dtype", DTYPES)
def test_posterior_steps_equal_the_reference(dtype, host_reads):
    for case, vocab in enumerate([2, 50, 1024, 1800]):
        x, gen = _case(31 + case, 12, vocab, dtype)
        temp, top_k, top_p, min_p = _per_row(gen, 12, vocab, filters=case % 2 == 1, greedy="mixed" if case else "none")
        seeds = torch.randint(0, 2**62, (12,), generator=gen)
        mask_id = vocab - 1
        x_t = torch.randint(0, vocab, (12,), generator=gen)
        x_t[torch.rand(12, generator=gen) < 0.6] = mask_id
        a_t = torch.rand(12, generator=gen) * 0.5
        a_s = a_t + torch.rand(12, generator=gen) * 0.5
        mode = ["inclusive", "bd3lm"][case % 2]
        ref = ref_decoding.mdlm_step_reference(x, x_t, mask_id, a_t, a_s, temp, top_p, seeds, 3, top_k=top_k,
                                               min_p=min_p, top_p_mode=mode)
        x_s, _ = fast_decoding.mdlm_step(x, x_t, mask_id, a_t, a_s, (temp, 0.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0),
                                         (seeds, 0), 3, mode)
        assert torch.equal(x_s, ref)
        x_t = torch.randint(0, vocab, (12,), generator=gen)
        ref = ref_decoding.udlm_step_reference(x, x_t, a_t, a_s, seeds, 6)
        x_s, _ = fast_decoding.udlm_step(x, x_t, a_t, a_s, (seeds, 0), 6)
        assert torch.equal(x_s, ref)


def test_mdlm_step_reads_only_revealed_rows():
    x, _ = _case(3, 4, 30, torch.float32)
    x_t = torch.tensor([29, 29, 5, 29])
    a_t, a_s = torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0])  # row 1 never reveals
    x[1, 3] = float("nan")  # masked but not revealed: never read, never flagged
    x[2, 3] = float("nan")  # not masked: never read
    x_s, bad = fast_decoding.mdlm_step(x, x_t, 29, a_t, a_s, (None, 1.0), (None, 0), (None, 1.0), (None, 0.0),
                                       (None, 0), 0)
    assert not bool(bad.any()) and x_s[1] == 29 and x_s[2] == 5 and bool((x_s[[0, 3]] != 29).all())
    x[0, 3] = float("nan")  # revealed: flagged, stays masked
    x_s, bad = fast_decoding.mdlm_step(x, x_t, 29, a_t, a_s, (None, 1.0), (None, 0), (None, 1.0), (None, 0.0),
                                       (None, 0), 0)
    assert bad.tolist() == [True, False, False, False] and x_s[0] == 29


def test_the_torch_backend_runs_the_fast_path():
    # ddiff's public ops on backend="torch" give the reference's tokens.
    x, gen = _case(9, 2, 3000, torch.bfloat16)
    x3 = x.view(2, 1, 3000).expand(2, 3, 3000).contiguous()
    seeds = torch.full((6,), 21)
    ref = ref_decoding.predict_tokens_reference(
        x3.view(6, 3000), None, torch.full((6,), 0.8), torch.full((6,), 40), torch.full((6,), 0.9), torch.zeros(6),
        seeds, 2, confidence="margin", confidence_from="sampling")
    tokens, conf = ddiff.predict_tokens(x3, None, 0.8, 40, 0.9, confidence="margin", confidence_from="sampling",
                                        seed=21, offset=2, backend="torch")
    assert torch.equal(tokens.flatten(), ref[0]) and torch.allclose(conf.flatten(), ref[1], rtol=1e-5, atol=1e-6)
    sampled = ddiff.sample(x, temperature=0.8, top_k=40, top_p=0.9, seed=21, offset=2, backend="torch")
    assert torch.equal(sampled, ref_sampling.sample_reference(
        x, torch.full((2,), 0.8), torch.full((2,), 40), torch.full((2,), 0.9), torch.zeros(2), torch.full((2,), 21), 2)[0])


def test_noise_from_concurrent_threads():
    # The NumPy Philox reuses its buffers per thread: threads sampling at once get their own.
    import threading

    expected = {seed: fast_rng.gumbel(seed, 0, torch.arange(2), torch.arange(1024), 0) for seed in range(4)}
    results, errors = {}, []

    def draw(seed):
        try:
            for _ in range(20):
                out = fast_rng.gumbel(seed, 0, torch.arange(2), torch.arange(1024), 0)
                if not torch.equal(out, expected[seed]):
                    errors.append(seed)
            results[seed] = True
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=draw, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
