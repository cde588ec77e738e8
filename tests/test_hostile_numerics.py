"""Hostile numerics (issue 17): the torch backend's peak memory (item 19), Triton probabilities at
low temperature (item 7) and huge finite logits on Triton (item 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddiff
from ddiff.torch_fast import decoding as fast_decoding
from ddiff.torch_fast import sampling as fast_sampling

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Item 19: the torch backend processes rows in chunks of bounded memory
# ---------------------------------------------------------------------------------------------

# Runs in a fresh interpreter; each case in a forked child, whose peak RSS (ru_maxrss) starts at
# its size at the fork: the op's extra peak is that peak minus the RSS just before the op (after a
# warm-up call in the child, as a fork maps the libraries' pages lazily).
_PEAK_SCRIPT = r"""
import json, os, resource, sys
import torch, ddiff

torch.set_num_threads(1)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(op, x):
    rows = x.shape[0]
    if op == "sample":
        return ddiff.sample(x, temperature=0.7, top_k=50, min_p=0.01, seed=1, backend="torch")
    if op == "sample_plain":
        return ddiff.sample(x, temperature=0.7, seed=1, backend="torch")
    if op == "filter_logits":
        return ddiff.filter_logits(x, top_k=50, top_p=0.9, backend="torch")
    if op == "predict_tokens":
        mask = torch.arange(rows) % 3 != 0
        return ddiff.predict_tokens(x, mask, temperature=0.7, seed=1, confidence="neg_entropy", backend="torch")
    if op == "mdlm_step":
        x_t = torch.full((rows,), x.shape[1] - 1)
        a = torch.full((rows,), 0.5)
        return ddiff.mdlm_step(x, x_t, x.shape[1] - 1, a * 0, a, temperature=0.8, seed=1, backend="torch")
    if op == "udlm_step":
        x_t = torch.arange(rows) % x.shape[1]
        a = torch.full((rows,), 0.5)
        return ddiff.udlm_step(x, x_t, a * 0.5, a, seed=1, backend="torch")
    raise ValueError(op)


results = []
for op, rows, vocab, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    run(op, torch.randn(4, vocab).to(dtype))  # warm-up: imports, caches
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        run(op, torch.randn(4, vocab).to(dtype))  # fault the code pages in (a fork maps them lazily)
        x = torch.randn(rows, vocab, dtype=dtype, generator=torch.Generator().manual_seed(0))
        base = rss()
        out = run(op, x)
        extra = peak() - base
        out = out if isinstance(out, tuple) else (out,)
        outputs = sum(t.numel() * t.element_size() for t in out)
        os.write(write, json.dumps([op, rows, vocab, x.numel() * x.element_size(), outputs, extra]).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.waitpid(pid, 0)
    results.append(json.loads(data))
print(json.dumps(results))
"""


def _peaks(cases):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_torch_backend_extra_peak_memory_is_bounded():
    """Beyond its input, an op's peak memory (outputs included) stays within 1.5x the input's size;
    at a tiny vocabulary (rows padded to a 1024-column tile) within its outputs plus the minimum
    chunk budget (``CHUNK_MIN_BYTES``), where it used to be ~1000x the input."""
    cases = [["sample", 512, 32768, "bfloat16"], ["filter_logits", 512, 32768, "bfloat16"],
             ["predict_tokens", 512, 32768, "bfloat16"], ["mdlm_step", 384, 32768, "bfloat16"],
             ["udlm_step", 384, 32768, "bfloat16"], ["sample_plain", 100000, 2, "bfloat16"]]
    slack = 3 << 20  # pages the interpreter and the allocator touch on the side
    report, over = [], []
    for op, rows, vocab, size, outputs, extra in _peaks(cases):
        if vocab >= 1024:
            limit = 1.5 * size + slack
        else:
            limit = 1.5 * size + outputs + getattr(fast_sampling, "CHUNK_MIN_BYTES", 4 << 20) + slack
        report.append(f"{op} [{rows}, {vocab}]: input {size / 2**20:.1f} MiB, extra peak {extra / 2**20:.1f} MiB "
                      f"({extra / size:.2f}x), limit {limit / 2**20:.1f} MiB")
        if extra > limit:
            over.append(op)
    assert not over, "\n".join(report)


def _chunking_cases(gen, rows, vocab, dtype):
    x = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    temp = torch.rand(rows, generator=gen) * 1.5 + 0.05
    temp[::4] = 0.0
    top_k = torch.randint(0, vocab + 3, (rows,), generator=gen)
    top_k[::2] = 0
    top_p = torch.rand(rows, generator=gen) * 0.9 + 0.05
    top_p[1::3] = 1.0
    min_p = torch.rand(rows, generator=gen) * 0.2
    min_p[::2] = 0.0
    seeds = torch.randint(0, 2**62, (rows,), generator=gen)
    return x, temp, top_k, top_p, min_p, seeds


def _all_ops(x, temp, top_k, top_p, min_p, seeds, gen, full=True):
    rows, vocab = x.shape
    out = []
    for mode in ("inclusive", "bd3lm"):
        out += fast_sampling.sample(x, (temp, 0.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0), (seeds, 0), 5, mode)
        out += fast_sampling.filter_logits(x, (top_k, 0), (top_p, 1.0), (min_p, 0.0), mode)
    out += fast_sampling.sample(x, (None, 0.9), (None, 0), (None, 1.0), (None, 0.0), (None, 3), 2)
    out += fast_sampling.filter_logits(x, (None, 5), (None, 0.8), (None, 0.0))
    mask = torch.rand(rows, generator=gen) < 0.7
    suppress = torch.tensor([0, vocab - 1])
    for kind in ("prob", "margin", "neg_entropy", "random") if full else ("neg_entropy",):
        for conf_from in ("raw", "sampling") if full else ("raw",):
            for m in (None, mask):
                out += [t for t in fast_decoding.predict_tokens(
                    x, m, suppress, (temp, 0.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0), (seeds, 0), 4,
                    confidence=kind, confidence_from=conf_from, return_argmax=True) if t is not None]
    x_t = torch.randint(0, vocab, (rows,), generator=gen)
    x_t[torch.rand(rows, generator=gen) < 0.6] = vocab - 1
    a_t = torch.rand(rows, generator=gen) * 0.5
    a_s = a_t + torch.rand(rows, generator=gen) * 0.5
    out += fast_decoding.mdlm_step(x, x_t, vocab - 1, a_t, a_s, (temp, 0.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0),
                                   (seeds, 0), 3)
    out += fast_decoding.udlm_step(x, x_t, a_t, a_s, (seeds, 0), 6)
    return out


@pytest.mark.parametrize("rows,vocab,dtype,threads", [(11, 1500, torch.float32, 1), (9, 7, torch.bfloat16, 1),
                                                      (5, 33000, torch.float16, 2)])
def test_row_chunks_change_no_result(monkeypatch, rows, vocab, dtype, threads):
    """Tokens, probabilities, filtered logits, confidences: bit-identical in chunks of 2-3 rows
    (the noise is keyed by the global row index, the host flags are the whole batch's)."""
    width = -(-vocab // 1024) * 1024
    gen = torch.Generator().manual_seed(rows * vocab)
    case = _chunking_cases(gen, rows, vocab, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        monkeypatch.setattr(fast_sampling, "CHUNK_MIN_BYTES", 1 << 40)
        monkeypatch.setattr(fast_sampling, "CHUNK_MAX_BYTES", 1 << 40)
        assert len(fast_sampling.row_chunks(case[0])) == 1
        whole = _all_ops(*case, torch.Generator().manual_seed(1), full=vocab < 10000)
        budget = 3 * width * fast_sampling.WORK_BYTES_PER_COLUMN
        monkeypatch.setattr(fast_sampling, "CHUNK_MIN_BYTES", budget)
        monkeypatch.setattr(fast_sampling, "CHUNK_MAX_BYTES", budget)
        chunks = fast_sampling.row_chunks(case[0])
        assert len(chunks) > 1 and min(stop - start for start, stop in chunks) >= 2
        chunked = _all_ops(*case, torch.Generator().manual_seed(1), full=vocab < 10000)
    finally:
        torch.set_num_threads(before)
    assert len(whole) == len(chunked)
    for i, (a, b) in enumerate(zip(whole, chunked)):
        assert a.dtype == b.dtype and torch.equal(a, b), i


# ---------------------------------------------------------------------------------------------
# Items 7 and 8: Triton's probabilities at low temperature, huge finite logits
# ---------------------------------------------------------------------------------------------


def _both(fn):
    return fn("torch"), fn("triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_probabilities_at_low_temperature(dtype):
    """Probabilities never exceed 1 and agree with torch to the fp32 rounding of z = x / T
    (eps * max |z|: the tempered logits carry that absolute error on both backends)."""
    gen = torch.Generator().manual_seed(17)
    x = (torch.randn(16, 1100, generator=gen) * 2).to(dtype)
    for temperature in (1.55e-3, 2e-3):
        tol = 1e-6 + torch.finfo(torch.float32).eps * float(x.float().abs().max()) / temperature
        cases = {
            "sample": lambda be: ddiff.sample(x, temperature=temperature, seed=3, backend=be, return_probs=True),
            "predict_tokens": lambda be: ddiff.predict_tokens(x, temperature=temperature, seed=3, backend=be,
                                                              confidence="prob", confidence_from="sampling"),
            "sample top_k": lambda be: ddiff.sample(x, temperature=temperature, top_k=50, seed=3, backend=be,
                                                    return_probs=True),
        }
        for name, fn in cases.items():
            (tok_ref, p_ref), (tok, p) = _both(fn)
            where = f"{name} T={temperature}"
            assert torch.equal(tok, tok_ref), where
            assert float(p.max()) <= 1.0 and float(p_ref.max()) <= 1.0, (where, float(p.max()))
            assert float((p - p_ref).abs().max()) <= tol, (where, float((p - p_ref).abs().max()), tol)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's NumPy: -3e38 - 3e38
def test_triton_samples_huge_finite_logits_like_torch():
    """A finite fp32 logit above FLT_MAX / log2(e) (~2.36e38) is sampled, not flagged, on Triton
    as on torch: greedy, sampled, unfiltered and filtered, and its confidences agree."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1100, generator=gen)
    x[:, 5] = 3.0e38
    x[1, 7] = -3.0e38
    x[2, 1030] = 2.9e38
    for filters in ({}, {"top_k": 50}, {"top_p": 0.95}):
        for temperature in (1.0, 0.0):
            toks_ref, p_ref = ddiff.sample(x, temperature=temperature, seed=3, backend="torch", return_probs=True,
                                           **filters)
            toks, p = ddiff.sample(x, temperature=temperature, seed=3, backend="triton", return_probs=True, **filters)
            assert toks.tolist() == toks_ref.tolist() == [5, 5, 5], (filters, temperature)
            assert torch.allclose(p, p_ref, rtol=1e-5, atol=1e-6), (filters, temperature, p, p_ref)
        for kind in ("prob", "neg_entropy"):
            out_ref = ddiff.predict_tokens(x, temperature=1.0, seed=3, backend="torch", confidence=kind, **filters)
            out = ddiff.predict_tokens(x, temperature=1.0, seed=3, backend="triton", confidence=kind, **filters)
            assert torch.equal(out[0], out_ref[0]), (filters, kind)
            assert torch.allclose(out[1], out_ref[1], rtol=1e-5, atol=1e-6), (filters, kind, out[1], out_ref[1])
