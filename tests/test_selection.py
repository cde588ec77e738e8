"""select_transfer / num_transfer_tokens / select_edits.

The Triton kernel (interpreted on CPU) is checked against the PyTorch reference, and the
reference against straight per-row loops written here (a generic oracle, and a loop that
follows Fast-dLLM's ``get_transfer_index_dynamic`` step by step).
"""

import math
import zlib

import pytest
import torch

import ddiff
from ddiff.ops import num_transfer_tokens, select_edits, select_transfer

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------
def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _row_order(conf_row, mask_row):
    """Candidate positions sorted by (confidence desc, position asc); values as fp32 floats."""
    vals = {}
    for i in range(conf_row.numel()):
        if bool(mask_row[i]):
            v = float(conf_row[i].float())
            vals[i] = NEG_INF if math.isnan(v) else v
    return sorted(vals, key=lambda i: (-vals[i], i)), vals


def oracle(conf, mask, num_transfer=None, threshold=None, min_transfer=1):
    """Per-row loop restating the top-k / threshold / both rules."""
    B, L = conf.shape
    out = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        order, vals = _row_order(conf[b], mask[b])
        n = len(order)
        k = None
        if num_transfer is not None:
            k = int(num_transfer[b]) if isinstance(num_transfer, torch.Tensor) and num_transfer.dim() else int(num_transfer)
            k = max(k, 0)
        if threshold is not None:
            t = float(threshold[b]) if isinstance(threshold, torch.Tensor) and threshold.dim() else float(threshold)
            passers = [i for i in order if vals[i] > _f32(t)]
            need = k if k is not None else min_transfer
            chosen = passers if len(passers) >= need else order[: min(need, n)]
        else:
            chosen = order[: min(k, n)]
        for i in chosen:
            out[b, i] = True
    return out


def fastdllm_dynamic(conf, mask, factor):
    """Fast-dLLM's get_transfer_index_dynamic selection, one row at a time.

    Same walk as the original (bars 1 - factor/(n+1) in float64, rank 1's bar -1, stop at
    the first rank whose sorted confidence is below its bar, bump the count when the stop
    is at rank 1 or at the last rank; skip rows with no masked token). The final
    ``torch.topk`` is replaced by a stable descending sort so that ties go to the lower
    position, which is ddiff's documented tie rule.
    """
    B, L = conf.shape
    conf = conf.float()
    masked = torch.where(mask, conf, torch.full_like(conf, NEG_INF))
    out = torch.zeros(B, L, dtype=torch.bool)
    for j in range(B):
        f = float(factor[j]) if isinstance(factor, torch.Tensor) else float(factor)
        n = int(mask[j].sum())
        if n == 0:
            continue
        bars = [1 - f / (r + 1) for r in range(1, n + 1)]
        bars[0] = -1
        ranked = torch.sort(conf[j][mask[j]], descending=True).values
        for top_i in range(n):
            if ranked[top_i] < bars[top_i]:
                break
        if top_i == 0 or top_i == n - 1:
            top_i += 1
        idx = torch.sort(masked[j], descending=True, stable=True).indices[:top_i]
        out[j, idx] = True
    return out


def llada_num_transfer_tokens(mask_index, steps):
    """LLaDA's get_num_transfer_tokens, written as the original loop."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    res = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        res[i, : remainder[i]] += 1
    return res


def both_backends(conf, mask, **kw):
    ref = select_transfer(conf, mask, backend="torch", **kw)
    tri = select_transfer(conf, mask, backend="triton", **kw)
    assert ref.dtype == torch.bool and ref.shape == conf.shape
    assert torch.equal(tri, ref), (kw, conf, mask, tri, ref)
    assert not (ref & ~mask).any()
    return ref


def random_inputs(gen, B, L, *, ties, p_mask=0.7, dtype=torch.float32):
    if ties:  # few distinct values, incl. -0.0/+0.0 and -inf, to force ties
        conf = torch.randint(0, 5, (B, L), generator=gen).float() / 4
        sign = torch.rand(B, L, generator=gen) < 0.5
        conf = torch.where(sign, -conf, conf)
        conf[torch.rand(B, L, generator=gen) < 0.1] = NEG_INF
    else:
        conf = torch.rand(B, L, generator=gen)
    mask = torch.rand(B, L, generator=gen) < p_mask
    if B > 1:
        mask[0] = False  # a row with no candidates
        mask[-1] = True  # a row where everything is a candidate
    return conf.to(dtype), mask


SHAPES = [(1, 1), (2, 5), (3, 37), (2, 130), (2, 300)]


# ----------------------------------------------------------------------------------------
# rules: triton == reference == oracle
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L", SHAPES)
@pytest.mark.parametrize(
    "rule", ["topk", "topk_tensor", "threshold", "threshold_tensor", "both", "both_tensor"]
)
def test_rules_match_reference_and_oracle(B, L, rule):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, L, rule)).encode()))
    for ties in (False, True):
        conf, mask = random_inputs(gen, B, L, ties=ties)
        kw = {}
        if rule.startswith("topk") or rule.startswith("both"):
            if rule.endswith("tensor"):
                kw["num_transfer"] = torch.randint(0, L + 3, (B,), generator=gen)
            else:
                kw["num_transfer"] = int(torch.randint(0, L + 3, (1,), generator=gen))
        if rule.startswith("threshold") or rule.startswith("both"):
            if rule.endswith("tensor"):
                kw["threshold"] = torch.rand(B, generator=gen)
            else:
                kw["threshold"] = 0.5 if ties else 0.8
        if rule == "threshold_tensor":
            kw["min_transfer"] = int(torch.randint(0, 4, (1,), generator=gen))
        got = both_backends(conf, mask, **kw)
        assert torch.equal(got, oracle(conf, mask, **kw))


@pytest.mark.parametrize("B,L", SHAPES)
@pytest.mark.parametrize("mode", ["uniform", "grid", "confident"])
def test_factor_matches_fastdllm(B, L, mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, L, mode)).encode()))
    if mode == "uniform":
        conf = torch.rand(B, L, generator=gen)
    elif mode == "grid":  # multiples of 1/8: hits bars 1 - f/(n+1) exactly (>= vs > matters)
        conf = torch.randint(0, 9, (B, L), generator=gen).float() / 8
    else:  # mostly confident: long runs pass, the quirk at the last rank shows up
        conf = 1 - torch.rand(B, L, generator=gen) ** 3 * 0.3
    mask = torch.rand(B, L, generator=gen) < 0.8
    if B > 1:
        mask[0] = False
    for factor in (1.0, 0.3, torch.rand(B, generator=gen) * 2 + 0.05):
        got = both_backends(conf, mask, factor=factor)
        assert torch.equal(got, fastdllm_dynamic(conf, mask, factor))
        n_cand = mask.sum(1)
        assert torch.all((got.sum(1) >= 1) | (n_cand == 0))


def test_factor_examples():
    conf = torch.tensor(
        [
            [0.99, 0.10, 0.0, 0.0],  # N = 2: rank 2 fails, but it is the last rank -> both
            [0.99, 0.98, 0.10, 0.0],  # rank 3 (last) fails -> all 3 (Fast-dLLM quirk)
            [0.99, 0.10, 0.10, 0.10],  # rank 2 fails -> 1
            [0.99, 0.70, 0.80, 0.10],  # sorted .99 .8 .7 .1: bars -, .667, .75, .8 -> rank 3 fails -> 2
            [0.50, 0.75, 0.70, 0.80],  # sorted .8 .75 .7 .5: rank 2 (.75 >= .667) ok, rank 3 .7 < .75 -> 2
        ]
    )
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(both_backends(conf, mask, factor=1.0), expected)
    # equality with the bar passes (Fast-dLLM breaks only on c_n < bar): 0.75 == 1 - 1/4
    conf = torch.tensor([[0.9, 0.8, 0.75, 0.1, 0.1]])
    assert both_backends(conf, torch.ones_like(conf, dtype=torch.bool), factor=1.0).sum() == 3


# ----------------------------------------------------------------------------------------
# ties, counts, edge cases
# ----------------------------------------------------------------------------------------
def test_ties_lower_position_wins():
    conf = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.5, -0.0, 0.0], [0.0, 0.0, 0.0, -0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    got = both_backends(conf, mask, num_transfer=3)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 3]
    assert got[1].nonzero().flatten().tolist() == [1, 2, 3]
    got = both_backends(conf, mask, num_transfer=torch.tensor([6, 4]))
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]  # -0.0 ties 0.0: lower position
    assert got[1].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_counts_and_empty_rows():
    gen = torch.Generator().manual_seed(1)
    conf = torch.rand(4, 19, generator=gen)
    mask = torch.rand(4, 19, generator=gen) < 0.5
    mask[1] = False
    mask[2] = True
    n_cand = mask.sum(1)
    # k larger than the candidates -> all candidates; k = 0 -> nothing
    assert torch.equal(both_backends(conf, mask, num_transfer=100), mask)
    assert not both_backends(conf, mask, num_transfer=0).any()
    got = both_backends(conf, mask, num_transfer=torch.tensor([0, 5, 3, 1000]))
    assert got.sum(1).tolist() == [0, 0, 3, int(n_cand[3])]
    # negative per-row entries count as 0
    assert not both_backends(conf, mask, num_transfer=torch.tensor([-1, -5, -2, -9])).any()
    # threshold nobody passes: min_transfer floor, clamped to N; min_transfer=0 -> nothing
    assert both_backends(conf, mask, threshold=2.0).sum(1).tolist() == [min(1, int(n)) for n in n_cand]
    assert both_backends(conf, mask, threshold=2.0, min_transfer=3).sum(1).tolist() == [
        min(3, int(n)) for n in n_cand
    ]
    assert not both_backends(conf, mask, threshold=2.0, min_transfer=0).any()
    assert torch.equal(both_backends(conf, mask, threshold=2.0, min_transfer=50), mask)
    # threshold everybody passes
    assert torch.equal(both_backends(conf, mask, threshold=-1.0), mask)
    # both: enough pass -> all passers even beyond k; too few -> top k
    got = both_backends(conf, mask, num_transfer=1, threshold=0.0)
    assert torch.equal(got, mask & (conf > 0))
    got = both_backends(conf, mask, num_transfer=2, threshold=2.0)
    assert got.sum(1).tolist() == [min(2, int(n)) for n in n_cand]
    # strictness: confidence equal to the threshold does not pass
    c = torch.tensor([[0.5, 0.25, 0.5]])
    m = torch.ones_like(c, dtype=torch.bool)
    assert both_backends(c, m, threshold=0.5, min_transfer=0).sum() == 0
    assert both_backends(c, m, threshold=0.25, min_transfer=0).tolist() == [[True, False, True]]


def test_empty_shapes():
    for B, L in [(0, 7), (3, 0), (0, 0)]:
        conf = torch.rand(B, L)
        mask = torch.ones(B, L, dtype=torch.bool)
        for kw in ({"num_transfer": 2}, {"threshold": 0.5}, {"factor": 1.0}, {"num_transfer": torch.ones(B, dtype=torch.long)}):
            got = both_backends(conf, mask, **kw)
            assert got.shape == (B, L)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_special_values(dtype):
    gen = torch.Generator().manual_seed(7)
    conf, mask = random_inputs(gen, 3, 45, ties=True, dtype=dtype)
    conf[1][torch.isinf(conf[1])] = 0.25
    conf[1, 3] = float("nan")
    conf[1, 4] = float("inf")
    mask[1, 3:5] = True
    for kw in ({"num_transfer": 7}, {"threshold": 0.4, "min_transfer": 2}, {"num_transfer": 3, "threshold": 0.2}, {"factor": 2.0}):
        got = both_backends(conf, mask, **kw)
        if "factor" not in kw:
            assert torch.equal(got, oracle(conf, mask, **kw))
    # NaN counts as -inf: selected only after every finite candidate
    got = both_backends(conf, mask, num_transfer=int(mask[1].sum()) - 1)
    assert got[1, 4] and not got[1, 3]


def test_strided_inputs_and_scalar_tensors():
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(40, 6, generator=gen)
    conf = base.t()  # [6, 40], column stride != 1
    mask = (torch.rand(40, 6, generator=gen) < 0.6).t()
    kw = {"num_transfer": torch.tensor(4), "threshold": torch.tensor(0.7, dtype=torch.float64)}
    got = both_backends(conf, mask, **kw)
    assert torch.equal(got, oracle(conf, mask, num_transfer=4, threshold=0.7))
    got = both_backends(conf[::2], mask[::2], num_transfer=torch.arange(3, dtype=torch.int32))
    assert torch.equal(got, oracle(conf[::2], mask[::2], num_transfer=torch.arange(3)))
    both_backends(conf, mask, factor=torch.tensor(0.8))


def test_long_rows_fall_back_to_reference(monkeypatch):
    from ddiff.kernels import selection as _k

    monkeypatch.setattr(_k, "MAX_L", 8)
    gen = torch.Generator().manual_seed(5)
    conf, mask = random_inputs(gen, 2, 20, ties=True)
    both_backends(conf, mask, num_transfer=3, threshold=0.3)
    both_backends(conf, mask, factor=torch.tensor([1.0, 0.5]))


def test_auto_backend_on_cpu_uses_torch():
    conf = torch.rand(2, 9)
    mask = conf > 0.3
    assert torch.equal(select_transfer(conf, mask, num_transfer=2), select_transfer(conf, mask, num_transfer=2, backend="torch"))
    assert ddiff.select_transfer is select_transfer


# ----------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------
_C = torch.rand(2, 5)
_M = torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: select_transfer(_C, _M[:, :4], num_transfer=1), ValueError, "mask"),
        (lambda: select_transfer(_C[0], _M[0], num_transfer=1), ValueError, "confidence"),
        (lambda: select_transfer(_C, _M.int(), num_transfer=1), TypeError, "mask"),
        (lambda: select_transfer(_C.long(), _M, num_transfer=1), TypeError, "confidence"),
        (lambda: select_transfer(_C.tolist(), _M, num_transfer=1), TypeError, "confidence"),
        (lambda: select_transfer(_C, _M), ValueError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=-1), ValueError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=1.5), TypeError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=True), TypeError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=torch.ones(3, dtype=torch.long)), ValueError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=torch.ones(2, 1, dtype=torch.long)), ValueError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=torch.ones(2)), TypeError, "num_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=torch.ones(2, dtype=torch.long, device="meta")), ValueError, "num_transfer"),
        (lambda: select_transfer(_C, _M, threshold="0.5"), TypeError, "threshold"),
        (lambda: select_transfer(_C, _M, threshold=torch.ones(2, dtype=torch.long)), TypeError, "threshold"),
        (lambda: select_transfer(_C, _M, threshold=torch.ones(4)), ValueError, "threshold"),
        (lambda: select_transfer(_C, _M, factor=1.0, num_transfer=2), ValueError, "factor"),
        (lambda: select_transfer(_C, _M, factor=1.0, threshold=0.9), ValueError, "factor"),
        (lambda: select_transfer(_C, _M, factor=0.0), ValueError, "factor"),
        (lambda: select_transfer(_C, _M, factor=torch.ones(3)), ValueError, "factor"),
        (lambda: select_transfer(_C, _M, threshold=0.5, min_transfer=-1), ValueError, "min_transfer"),
        (lambda: select_transfer(_C, _M, threshold=0.5, min_transfer=1.0), TypeError, "min_transfer"),
        (lambda: select_transfer(_C, _M, num_transfer=1, backend="cuda"), ValueError, "backend"),
        (lambda: num_transfer_tokens(_M, 0), ValueError, "steps"),
        (lambda: num_transfer_tokens(_M, 2.0), TypeError, "steps"),
        (lambda: num_transfer_tokens(_M.int(), 2), TypeError, "mask"),
        (lambda: num_transfer_tokens(_M[0], 2), ValueError, "mask"),
        (lambda: select_edits(_C.long(), _C, _C.long(), _M[:, :3], 0.5), ValueError, "editable"),
        (lambda: select_edits(_C.long(), _C, _C.long(), _M.int(), 0.5), TypeError, "editable"),
        (lambda: select_edits(_C.long(), _C.long(), _C.long(), _M, 0.5), TypeError, "confidence"),
        (lambda: select_edits(_C, _C, _C.long(), _M, 0.5), TypeError, "pred_tokens"),
        (lambda: select_edits(_C.long(), _C, _C.long(), _M, torch.ones(3)), ValueError, "threshold"),
        (lambda: select_edits(_C.long(), _C, _C.long(), _M, None), TypeError, "threshold"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------
# num_transfer_tokens, select_edits
# ----------------------------------------------------------------------------------------
def test_num_transfer_tokens_matches_llada():
    gen = torch.Generator().manual_seed(11)
    for B, L in [(1, 1), (3, 32), (5, 97)]:
        mask = torch.rand(B, L, generator=gen) < 0.6
        if B > 1:
            mask[0] = False  # a row with nothing masked
        for steps in (1, 3, 7, 64, L + 5):
            got = num_transfer_tokens(mask, steps)
            assert got.dtype == torch.int64 and got.shape == (B, steps)
            assert torch.equal(got, llada_num_transfer_tokens(mask, steps))
            assert torch.equal(got.sum(1), mask.sum(1))
    assert num_transfer_tokens(torch.tensor([[True] * 7 + [False]]), 3).tolist() == [[3, 2, 2]]
    assert num_transfer_tokens(torch.zeros(0, 4, dtype=torch.bool), 2).shape == (0, 2)


def test_select_edits():
    pred = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    x = torch.tensor([[5, 0, 0, 0], [0, 2, 0, 0]])
    conf = torch.tensor([[0.99, 0.95, 0.9, 0.5], [0.99, 0.99, 0.8, 0.9]])
    editable = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert select_edits(pred, conf, x, editable, 0.9).tolist() == [
        [False, True, False, False],
        [False, False, False, False],
    ]
    assert select_edits(pred, conf, x, editable, torch.tensor([0.4, 0.7])).tolist() == [
        [False, True, True, True],
        [False, False, True, True],
    ]
    gen = torch.Generator().manual_seed(2)
    pred = torch.randint(0, 3, (4, 33), generator=gen)
    x = torch.randint(0, 3, (4, 33), generator=gen)
    conf = torch.rand(4, 33, generator=gen).half()
    editable = torch.rand(4, 33, generator=gen) < 0.5
    thr = torch.rand(4, generator=gen)
    want = editable & (pred != x) & (conf.float() > thr[:, None])
    assert torch.equal(select_edits(pred, conf, x, editable, thr), want)


# ----------------------------------------------------------------------------------------
# torch.library / torch.compile
# ----------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(conf, mask, k):
        sel = select_transfer(conf, mask, num_transfer=k, threshold=0.6, backend="torch")
        sel = sel | select_transfer(conf, mask, factor=1.0, backend="torch")
        return torch.where(sel, 1, 0)

    gen = torch.Generator().manual_seed(4)
    conf = torch.rand(3, 17, generator=gen)
    mask = torch.rand(3, 17, generator=gen) < 0.7
    k = torch.tensor([1, 2, 3])
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(conf, mask, k), step(conf, mask, k))


def test_opcheck_torch_op():
    conf = torch.rand(3, 10)
    mask = conf > 0.2
    torch.library.opcheck(
        torch.ops.ddiff.select_transfer_torch.default,
        (conf, mask, torch.tensor([1, 2, 3]), 0, None, 0.0, None, 0.0, 2, 1),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("L", [1, 100, 1024, 4096])
def test_cuda_compiled_kernel(L):
    gen = torch.Generator().manual_seed(L)
    for ties in (False, True):
        conf, mask = random_inputs(gen, 64, L, ties=ties)
        conf, mask = conf.cuda(), mask.cuda()
        for kw in (
            {"num_transfer": 7},
            {"num_transfer": torch.randint(0, L + 2, (64,), generator=gen).cuda()},
            {"threshold": 0.5},
            {"threshold": torch.rand(64, generator=gen).cuda(), "min_transfer": 2},
            {"num_transfer": 3, "threshold": 0.3},
            {"factor": 1.0},
            {"factor": torch.rand(64, generator=gen).cuda() + 0.1},
        ):
            for dtype in (torch.float32, torch.bfloat16):
                c = conf.to(dtype)
                tri = select_transfer(c, mask, backend="triton", **kw)
                ref = select_transfer(c, mask, backend="torch", **kw)
                assert torch.equal(tri, ref), kw
