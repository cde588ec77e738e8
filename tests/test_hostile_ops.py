"""Hostile inputs at the op level (issue 17, items 2, 3, 13, 14, 15 and 24), on both backends.

* 2: ``udlm_step`` flags a NaN row as token -1 inside ``sync_checks(False)`` (and raises with
  the checks on), as every op does.
* 3: ``udlm_step`` with an ``x_t`` id outside ``[0, V)``: ValueError naming ``x_t``; inside
  ``sync_checks(False)`` that position is -1 on both backends, never an id outside the vocabulary.
* 13: one seed rule (``ddiff._checks.check_seed``): any integer type (NumPy signed / unsigned,
  0-d integer tensors) in ``[-2**63, 2**64)``, -1 == ``2**64 - 1``; outside: ValueError naming ``seed``.
* 14: ``top_k >= V`` (``2**63``, ``2**64`` too) is a no-op on every op.
* 15: one temperature rule: finite in fp32 (else ValueError naming ``temperature``), below 1e-5 greedy.
* 24: ``suppress_tokens`` outside ``[0, V)`` raise on both backends, with the checks off too
  for host ids; device ids that reach the ops unchecked are ignored by both backends.

The Triton backend runs under the interpreter (tests/conftest.py): shapes are tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddiff
BACKENDS = ["torch", "triton"]
TEMPERATURE_EPS = 1e-5  # ddiff._checks.TEMPERATURE_EPS: below it a temperature is greedy
V = 20

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logits_3x(vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------------------------------------
# item 2: udlm_step flags a NaN row as -1 (checks off) and raises (checks on)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_udlm_step_nan_row_is_flagged_with_checks_off(backend):
    logits = logits_3x()
    logits[1, 4] = float("nan")
    x_t = torch.tensor([1, 2, 3])
    with ddiff.sync_checks(False):
        for seed in range(4):  # whichever part of the posterior the coin picks
            x_s = ddiff.udlm_step(logits, x_t, 0.3, 0.6, seed=seed, backend=backend)
            assert x_s[1] == -1
            assert ((x_s[[0, 2]] >= 0) & (x_s[[0, 2]] < V)).all()
    with pytest.raises(ValueError, match="row 1"):
        ddiff.udlm_step(logits, x_t, 0.3, 0.6, seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_udlm_step_flags_like_sample(backend):
    """Same rows flagged as ``sample`` (an all -inf row and +inf as well as NaN)."""
    logits = logits_3x()
    logits[0, 2] = float("inf")
    logits[2] = float("-inf")
    with ddiff.sync_checks(False):
        x_s = ddiff.udlm_step(logits, torch.tensor([0, 5, 7]), 0.0, 1.0, seed=3, backend=backend)
        tokens = ddiff.sample(logits, seed=3, backend=backend)
    assert (x_s == -1).tolist() == (tokens == -1).tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------
# item 3: udlm_step with x_t outside the vocabulary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_udlm_step_x_t_out_of_range(backend):
    logits = torch.randn(1, 5, V, generator=torch.Generator().manual_seed(1))
    x_t = torch.tensor([[23, 9, -1, 10, V]])
    with pytest.raises(ValueError, match="`x_t`"):
        ddiff.udlm_step(logits, x_t, 0.2, 0.7, seed=0, backend=backend)
    with ddiff.sync_checks(False):
        x_s = ddiff.udlm_step(logits, x_t, 0.2, 0.7, seed=0, backend=backend)
        ref = ddiff.udlm_step(logits, x_t, 0.2, 0.7, seed=0, backend="torch")
    assert x_s.tolist() == ref.tolist()
    assert x_s[0, [0, 2, 4]].tolist() == [-1, -1, -1]
    assert ((x_s[0, [1, 3]] >= 0) & (x_s[0, [1, 3]] < V)).all()
    # The in-range positions are those of a call without the bad ones (row-keyed noise).
    good = ddiff.udlm_step(logits, torch.tensor([[0, 9, 0, 10, 0]]), 0.2, 0.7, seed=0, backend=backend)
    assert x_s[0, [1, 3]].tolist() == good[0, [1, 3]].tolist()


# ---------------------------------------------------------------------------------------------
# item 13: seeds
# ---------------------------------------------------------------------------------------------
def test_check_seed_rule():
    from ddiff._checks import check_seed

    for value in (0, 3, -1, -(2**63), 2**64 - 1, np.int64(-5), np.uint64(2**64 - 1), np.int8(7), np.uint32(9),
                  torch.tensor(4), torch.tensor(-4, dtype=torch.int32)):
        assert check_seed("seed", value) == int(value)
    for bad in (2**64, -(2**63) - 1, 10**30):
        with pytest.raises(ValueError, match="`seed`"):
            check_seed("seed", bad)
    for bad in (1.0, True, "3", torch.tensor(1.0), torch.tensor([1, 2]), None):
        with pytest.raises(TypeError, match="`seed`"):
            check_seed("seed", bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_integer_types_on_every_op(backend):
    logits = logits_3x()
    base = ddiff.sample(logits, seed=3, backend=backend)
    for seed in (np.int64(3), np.uint64(3), np.int32(3), np.uint8(3), torch.tensor(3)):
        assert ddiff.sample(logits, seed=seed, backend=backend).tolist() == base.tolist()
    same = [ddiff.sample(logits, seed=s, backend=backend).tolist() for s in (-1, 2**64 - 1, np.uint64(2**64 - 1),
                                                                               np.int64(-1))]
    assert all(s == same[0] for s in same)
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="`seed`"):
            ddiff.sample(logits, seed=bad, backend=backend)
    x_t = torch.tensor([1, 2, 3])
    seed = np.int64(5)
    ddiff.predict_tokens(logits, temperature=0.5, seed=seed, backend=backend)
    ddiff.mdlm_step(logits, torch.full((3,), 4), 4, 0.2, 0.7, seed=seed, backend=backend)
    ddiff.udlm_step(logits, x_t, 0.2, 0.7, seed=seed, backend=backend)
    ddiff.renoise_uniform(x_t[None], vocab_size=V, seed=np.uint64(2**64 - 1), backend=backend)
    conf, mask = torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    ddiff.select_transfer(conf, mask, num_transfer=2, temperature=0.5, seed=seed, backend=backend)
    with pytest.raises(ValueError, match="`seed`"):
        ddiff.select_transfer(conf, mask, num_transfer=2, temperature=0.5, seed=2**64, backend=backend)


def test_seed_rule_in_the_token_diffusion_pipeline():
    import os

    from ddiff.pipelines import TokenDiffusionPipeline

    pipe = TokenDiffusionPipeline.from_pretrained(os.path.join(os.path.dirname(__file__), "assets", "tiny_token_mdlm"),
                                                  backend="torch")

    def run(seed):
        return pipe(batch_size=1, seq_len=4, num_inference_steps=2, seed=seed, progress=False,
                    output_type="ids").sequences.tolist()

    assert run(np.int64(3)) == run(np.uint64(3)) == run(torch.tensor(3)) == run(3)
    assert run(-1) == run(2**64 - 1)
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="`seed`"):
            run(bad)


def test_seed_rule_in_the_block_and_dflash_pipelines():
    from tiny_qwen3 import MASK, tiny_target

    from ddiff.pipelines import BlockDiffusionPipeline, DFlashDraftModel, DFlashPipeline

    target = tiny_target(dtype=torch.float32)
    block = BlockDiffusionPipeline(target, mask_token_id=MASK, backend="torch")
    ids = torch.tensor([[1, 5, 2]])

    def run_block(seed):
        return block(input_ids=ids, max_new_tokens=2, block_length=2, temperature=0.7, seed=seed, progress=False,
                     output_type="ids").sequences.tolist()

    assert run_block(np.int64(7)) == run_block(np.uint64(7)) == run_block(7)
    assert run_block(-1) == run_block(2**64 - 1)
    with pytest.raises(ValueError, match="`seed`"):
        run_block(2**64)

    torch.manual_seed(1)
    draft = DFlashDraftModel.from_target_config(target.config, 1, block_size=4, mask_token_id=MASK,
                                                target_layer_ids=[0, 1]).to(target.dtype).eval()
    dflash = DFlashPipeline(draft, target, None, backend="torch")

    def run_dflash(seed):
        return dflash(input_ids=ids, max_new_tokens=3, temperature=0.7, seed=seed, progress=False,
                      output_type="ids").sequences.tolist()

    assert run_dflash(np.int64(7)) == run_dflash(7)
    assert run_dflash(np.uint64(2**64 - 1)) == run_dflash(-1)
    with pytest.raises(ValueError, match="`seed`"):
        run_dflash(-(2**63) - 1)


def test_seed_rule_in_diffusion_gemma_step(monkeypatch):
    from types import SimpleNamespace

    from ddiff.integrations import diffusion_gemma as ddg

    logits = torch.randn(1, 4, V, generator=torch.Generator().manual_seed(2))
    a = ddg.entropy_bound_step(logits, entropy_bound=0.5, seed=np.int64(3), backend="torch")
    b = ddg.entropy_bound_step(logits, entropy_bound=0.5, seed=3, backend="torch")
    assert torch.equal(a.canvas, b.canvas)
    with pytest.raises(ValueError, match="`seed`"):
        ddg.entropy_bound_step(logits, entropy_bound=0.5, seed=2**64, backend="torch")
    # use_ddiff checks its seed before touching the model (any model class passes here)
    monkeypatch.setattr(ddg, "_transformers_generation",
                        lambda: SimpleNamespace(DiffusionGemmaGenerationMixin=torch.nn.Module))
    with pytest.raises(ValueError, match="`seed`"):
        ddg.use_ddiff(torch.nn.Module(), seed=2**64).__enter__()


# ---------------------------------------------------------------------------------------------
# item 14: top_k >= V is a no-op, however large
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_top_k_is_a_no_op(backend):
    logits = logits_3x()
    base = ddiff.sample(logits, temperature=0.8, seed=1, backend=backend)
    base_pred = ddiff.predict_tokens(logits, temperature=0.8, seed=1, backend=backend)
    x_t = torch.full((3,), 4)
    base_mdlm = ddiff.mdlm_step(logits, x_t, 4, 0.0, 1.0, seed=1, backend=backend)
    for k in (V, V + 1, 2**63 - 1, 2**63, 2**64, 10**30, np.uint64(2**64 - 1)):
        assert torch.equal(ddiff.filter_logits(logits, top_k=k, backend=backend), logits)
        assert ddiff.sample(logits, temperature=0.8, top_k=k, seed=1, backend=backend).tolist() == base.tolist()
        tokens, conf = ddiff.predict_tokens(logits, temperature=0.8, top_k=k, seed=1, backend=backend)
        assert tokens.tolist() == base_pred[0].tolist() and torch.equal(conf, base_pred[1])
        assert ddiff.mdlm_step(logits, x_t, 4, 0.0, 1.0, top_k=k, seed=1, backend=backend).tolist() == base_mdlm.tolist()
    # per-row tensors: uint64 entries of 2**63 and more keep everything too
    k = torch.tensor([2**64 - 1, 2**63, V], dtype=torch.uint64)
    assert ddiff.sample(logits, temperature=0.8, top_k=k, seed=1, backend=backend).tolist() == base.tolist()
    assert torch.equal(ddiff.filter_logits(logits, top_k=k, backend=backend), logits)


# ---------------------------------------------------------------------------------------------
# item 15: extreme temperatures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e39, 3.5e38, -1.0, -1e-30])
def test_temperature_out_of_fp32_range_raises(backend, bad):
    logits = logits_3x()
    x_t = torch.full((3,), 4)
    with pytest.raises(ValueError, match="`temperature`"):
        ddiff.sample(logits, temperature=bad, seed=0, backend=backend)
    with pytest.raises(ValueError, match="`temperature`"):
        ddiff.predict_tokens(logits, temperature=bad, seed=0, backend=backend)
    with pytest.raises(ValueError, match="`temperature`"):
        ddiff.mdlm_step(logits, x_t, 4, 0.0, 1.0, temperature=bad, seed=0, backend=backend)
    with pytest.raises(ValueError, match="`temperature`"):
        ddiff.select_transfer(torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool), num_transfer=2, temperature=bad,
                              seed=0, backend=backend)
    with pytest.raises(ValueError, match="`temperature`"):  # per-row tensors, checks on
        ddiff.sample(logits, temperature=torch.tensor([1.0, bad, 0.5]), seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiny", [1e-50, 1e-30, 1e-6, TEMPERATURE_EPS / 2])
def test_tiny_temperature_is_greedy(backend, tiny):
    logits = logits_3x() * 1e3  # logits / tiny overflow: greedy is the only defined answer
    greedy = logits.argmax(-1).tolist()
    assert ddiff.sample(logits, temperature=tiny, seed=0, backend=backend).tolist() == greedy
    tokens, _ = ddiff.predict_tokens(logits, temperature=tiny, seed=0, backend=backend)
    assert tokens.tolist() == greedy
    x_t = torch.full((3,), 4)
    masked = logits.clone()
    masked[:, 4] = float("-inf")
    out = ddiff.mdlm_step(logits, x_t, 4, 0.0, 1.0, temperature=tiny, seed=0, backend=backend)
    assert out.tolist() == masked.argmax(-1).tolist()
    # per-row tensors: normalised on the device, with the checks on and off
    t = torch.tensor([tiny, 0.7, tiny])
    for checks in (True, False):
        with ddiff.sync_checks(checks):
            mixed = ddiff.sample(logits, temperature=t, seed=0, backend=backend)
        assert mixed[[0, 2]].tolist() == [greedy[0], greedy[2]]
    conf, mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)), torch.ones(2, 5, dtype=torch.bool)
    plain = ddiff.select_transfer(conf, mask, num_transfer=2, backend=backend)
    assert torch.equal(ddiff.select_transfer(conf, mask, num_transfer=2, temperature=tiny, seed=0, backend=backend),
                       plain)
    assert torch.equal(ddiff.select_transfer(conf, mask, num_transfer=2, temperature=torch.tensor([tiny, tiny]),
                                             seed=0, backend=backend), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_per_row_temperature_with_checks_off_flags_the_row(backend):
    logits = logits_3x()
    t = torch.tensor([0.7, float("inf"), -2.0])
    with ddiff.sync_checks(False):
        tokens = ddiff.sample(logits, temperature=t, seed=0, backend=backend)
        pred, conf = ddiff.predict_tokens(logits, temperature=t, seed=0, backend=backend)
    assert tokens.tolist()[1:] == [-1, -1] and 0 <= tokens[0] < V
    assert pred.tolist()[1:] == [-1, -1] and torch.isnan(conf[1:]).all()


def test_extreme_temperatures_agree_between_backends():
    logits = logits_3x(V, 5)
    for t in (TEMPERATURE_EPS, 1e-3, 1e30, 3.4e38):
        out = [ddiff.sample(logits, temperature=t, seed=4, backend=b).tolist() for b in BACKENDS]
        assert out[0] == out[1], t
        out = [ddiff.predict_tokens(logits, temperature=t, seed=4, backend=b)[0].tolist() for b in BACKENDS]
        assert out[0] == out[1], t


# ---------------------------------------------------------------------------------------------
# item 24: suppress_tokens outside the vocabulary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids", [[-1], [5000], [3, V], torch.tensor([-1]), torch.tensor([2, 5000])])
@pytest.mark.parametrize("checks", [True, False])
def test_suppress_tokens_out_of_range_raise(backend, ids, checks):
    logits = logits_3x()
    with ddiff.sync_checks(checks):
        with pytest.raises(ValueError, match="`suppress_tokens`"):
            ddiff.predict_tokens(logits, suppress_tokens=ids, backend=backend)
        with pytest.raises(ValueError, match="`confidence_suppress_tokens`"):
            ddiff.predict_tokens(logits, confidence_suppress_tokens=ids, backend=backend)


def test_unchecked_device_suppress_ids_are_ignored_by_both_backends(monkeypatch):
    """Device ids inside sync_checks(False) cannot be read without a sync: they reach the ops,
    which ignore the out-of-range ones on both backends (the torch path is forced onto its
    device-side code here)."""
    import ddiff.torch_fast.sampling as fast

    monkeypatch.setattr(fast, "host_readable", lambda tensor: False)
    logits = logits_3x()
    bad_ids = torch.tensor([-1, 3, 5000, 7])
    good_ids = torch.tensor([3, 7])
    none_valid = torch.tensor([-1, 5000])
    for conf_from in ("raw", "sampling"):
        args = dict(temperature=0.9, confidence="prob", confidence_from=conf_from, seed=2)
        for backend in BACKENDS:
            want = ddiff.predict_tokens(logits, suppress_tokens=good_ids, confidence_suppress_tokens=good_ids,
                                        backend=backend, **args)
            plain = ddiff.predict_tokens(logits, backend=backend, **args)
            op = getattr(torch.ops.ddiff, f"predict_tokens_{backend}")
            for ids, expect in ((bad_ids, want), (none_valid, plain)):
                call = [logits, None, ids, None, 0.9, None, 0, None, 1.0, None, 0.0, None, 2, 0, "prob", conf_from,
                        "inclusive", ids, False]
                if backend == "triton":
                    call.append(False)
                with ddiff.sync_checks(False):
                    tokens, conf, _ = op(*call)
                assert tokens.tolist() == expect[0].tolist(), (backend, ids)
                torch.testing.assert_close(conf, expect[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_filter_logits_invalid_rows_are_nan_with_checks_off(backend):
    """Item 2: with the checks off an invalid row of ``filter_logits`` comes back all NaN on both
    backends (triton used to write finite values), so ``udlm_step`` after it flags the row."""
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    with ddiff.sync_checks(False):
        out = ddiff.filter_logits(logits, top_p=0.9, backend=backend)
        x = ddiff.udlm_step(out[None], torch.zeros(1, 4, dtype=torch.long), 0.5, 0.9, seed=0, backend=backend)
    assert torch.isnan(out[1:]).all() and not torch.isnan(out[0]).any()
    assert x[0].tolist()[1:] == [-1, -1, -1] and int(x[0, 0]) >= 0
