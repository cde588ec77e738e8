"""``torch.library.opcheck`` on every registered ddiff op, and the shared argument checks.

The arguments each op is checked with are the ones the public functions really pass: a
dispatch mode records every ``ddiff::*`` call made by a list of small public-API calls, on
both backends. A registered op that none of them reaches fails ``test_every_op_is_checked``,
so a new op needs a scenario here.

Under the Triton interpreter (no GPU) the Triton ops run ``test_schema``,
``test_autograd_registration`` and ``test_faketensor``; ``test_aot_dispatch_dynamic`` needs a
compiled kernel that AOTDispatcher can put in a graph (``wrap_triton``), so it runs on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddiff
from conftest import DEVICE
from ddiff._backend import triton_interpreting

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
INTERPRETER_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


class _RecordDdiffCalls(TorchDispatchMode):
    """Record the first call of every ``ddiff::`` op (with its arguments) and run it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ddiff":
            self.calls.setdefault(func.name(), (func, args, kwargs))
        return func(*args, **kwargs)


def _logits(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 2).to(dtype).to(DEVICE)


def _sampling(backend):
    logits = _logits(3, 40, dtype=torch.bfloat16)
    ddiff.sample(logits, temperature=torch.tensor([0.0, 0.7, 1.3], device=DEVICE), top_k=5, top_p=0.9, min_p=0.05,
                 seed=torch.tensor([1, 2, 3], device=DEVICE), offset=4, return_probs=True, backend=backend)
    ddiff.filter_logits(logits, top_k=torch.tensor([0, 3, 50], device=DEVICE), top_p=0.8, backend=backend)


def _decoding(backend):
    logits = _logits(2, 3, 30, seed=1)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    ddiff.predict_tokens(logits, mask, temperature=0.5, top_k=8, confidence="margin", suppress_tokens=[0, 29],
                         seed=5, backend=backend)
    x_t = torch.tensor([[29, 4, 29], [29, 29, 7]], device=DEVICE)
    ddiff.mdlm_step(logits, x_t, 29, 0.3, 0.7, top_p=0.9, seed=2, backend=backend)
    ddiff.udlm_step(logits, x_t, 0.3, 0.7, seed=2, backend=backend)


def _selection(backend):
    conf = _logits(2, 6, seed=2)
    mask = conf > -1.0
    ddiff.select_transfer(conf, mask, num_transfer=torch.tensor([1, 2], device=DEVICE), backend=backend)


def _noise(backend):
    renoise = getattr(ddiff, "renoise_uniform", None)
    if renoise is not None:
        tokens = torch.randint(0, 9, (2, 5), device=DEVICE)
        renoise(tokens, tokens > 4, vocab_size=9, seed=3, backend=backend)


def _attention(backend):
    if backend != "triton":  # the torch and flex paths of anchor_attention are not custom ops
        return
    B, Hq, Hkv, D, S, N, bs = 1, 2, 1, 16, 4, 2, 4
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, N * bs, D, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(B, Hkv, S + N * bs, D, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(B, Hkv, S + N * bs, D, generator=gen).to(DEVICE).requires_grad_()
    anchors = torch.tensor([[1, 4]], device=DEVICE)
    out = ddiff.anchor_attention(q, k, v, anchors, context_len=S, block_size=bs, backend=backend)
    out.sum().backward()


SCENARIOS = (_sampling, _decoding, _selection, _noise, _attention)


def _registered_ops() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("ddiff::"))


@pytest.fixture(scope="module")
def recorded_calls():
    recorder = _RecordDdiffCalls()
    with recorder:
        for backend in ("torch", "triton"):
            for scenario in SCENARIOS:
                scenario(backend)
    return recorder.calls


def test_every_op_is_checked(recorded_calls):
    missing = sorted(set(_registered_ops()) - set(recorded_calls))
    assert not missing, f"registered ops that no scenario of tests/test_opcheck.py calls: {missing}"


@pytest.mark.parametrize("name", _registered_ops())
def test_opcheck(name, recorded_calls):
    if name not in recorded_calls:
        pytest.fail(f"{name} is registered but no scenario calls it (see test_every_op_is_checked)")
    func, args, kwargs = recorded_calls[name]
    is_triton = name.endswith(("_triton", "_triton_backward"))
    utils = INTERPRETER_UTILS if is_triton and triton_interpreting() else ALL_UTILS
    torch.library.opcheck(func, args, kwargs, test_utils=utils)


# ---------------------------------------------------------------------------------------------
# Shared argument checks (ddiff._checks)
# ---------------------------------------------------------------------------------------------


def test_anchor_attention_range_check_follows_sync_checks():
    B, Hq, Hkv, D, S, N, bs = 1, 2, 1, 16, 4, 2, 4
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, Hq, N * bs, D, generator=gen)
    k = torch.randn(B, Hkv, S + N * bs, D, generator=gen)
    v = torch.randn(B, Hkv, S + N * bs, D, generator=gen)
    out_of_range = torch.tensor([[-3, 9]])
    with pytest.raises(ValueError, match="`anchors` must lie in"):
        ddiff.anchor_attention(q, k, v, out_of_range, context_len=S, block_size=bs, backend="torch")
    with ddiff.sync_checks(False):  # no host read of the anchors: they are clamped on the device
        unchecked = ddiff.anchor_attention(q, k, v, out_of_range, context_len=S, block_size=bs, backend="torch")
    clamped = ddiff.anchor_attention(q, k, v, torch.tensor([[0, S]]), context_len=S, block_size=bs, backend="torch")
    assert torch.equal(unchecked, clamped)


def test_one_module_holds_the_checks():
    import ddiff._checks as checks
    import ddiff._params as params

    assert params.sync_checks is checks.sync_checks and ddiff.sync_checks is checks.sync_checks
    assert params.row_param is checks.row_param and params.check_logits is checks.check_logits
    assert checks.is_int(3) and not checks.is_int(True) and not checks.is_int(3.0)
    assert checks.is_real(3) and checks.is_real(2.5) and not checks.is_real(False)
    with pytest.raises(TypeError, match="`steps`"):
        checks.check_int("steps", 2.0)
    with pytest.raises(ValueError, match="`steps` must be >= 1"):
        checks.check_int("steps", 0, 1)
    with pytest.raises(ValueError, match="`mask_token_id` must lie in"):
        checks.check_token_id("mask_token_id", 10, 10)
    with pytest.raises(ValueError, match="`top_k`"):
        checks.row_param("top_k", torch.ones(3, dtype=torch.long), 2, "cpu", integer=True, default=0)
    with pytest.raises(TypeError, match="`top_p`"):
        checks.row_param("top_p", torch.ones(2, dtype=torch.long), 2, "cpu", integer=False, default=1.0)
    with pytest.raises(ValueError, match="`temperature` must lie in"):
        checks.check_range("temperature", None, float("nan"), 0.0, None)
