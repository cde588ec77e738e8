"""BlockDiffusionScheduler on hand-made logits: every commit rule, schedule and stopping rule,
without a model (the pipeline tests check the same rules against the published loops)."""

import math

import pytest
import torch

from ddiff.pipelines.block_diffusion_scheduler import BlockDiffusionScheduler, BlockDiffusionSchedulerOutput

scipy_stats = pytest.importorskip("scipy.stats")

MASK, V = 0, 8


def logits_for(tokens, probs, vocab=V):
    """``[B, L, V]`` logits whose softmax gives ``tokens`` probability ``probs`` (the rest spread evenly
    over the other ids, the mask id included)."""
    tokens, probs = torch.as_tensor(tokens), torch.as_tensor(probs, dtype=torch.float64)
    rest = (1 - probs) / (vocab - 1)
    p = rest[..., None].expand(*tokens.shape, vocab).clone()
    p.scatter_(-1, tokens[..., None], probs[..., None])
    return p.log().float()


def run_block(sched, logits, x, steps=None, block_length=None, **kwargs):
    """Drive one block with fixed logits; returns the outputs of every step."""
    sched.set_timesteps(steps, block_length or x.shape[1], num_masked=int((x[0] == MASK).sum()))
    outs, i = [], 0
    while not sched.is_done(i, x == MASK, outs[-1] if outs else None):
        out = sched.step(logits, x, x == MASK, i, backend="torch", seed=0, offset=i, **kwargs)
        outs.append(out)
        x, i = out.x, i + 1
    return outs


def counts(outs):
    return [int(o.transfer_index.sum()) for o in outs]


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def test_llada_schedule_splits_the_block_evenly():
    sched = BlockDiffusionScheduler(mask_token_id=MASK)
    sched.set_timesteps(3, 7)
    assert [sched.num_transfer(torch.ones(1, 7, dtype=torch.bool), i) for i in range(3)] == [3, 2, 2]
    x = torch.full((1, 7), MASK)
    outs = run_block(sched, logits_for(torch.arange(7)[None] % 7 + 1, torch.full((1, 7), 0.5)), x, steps=3)
    assert counts(outs) == [3, 2, 2] and not (outs[-1].x == MASK).any()


@pytest.mark.parametrize("n, steps, expected", [(8, 4, [1, 2, 2, 3]), (16, 16, None), (7, 3, None), (32, 5, None)])
def test_dream_schedule(n, steps, expected):
    """int(m · (1 − s/t)) of the m masks left, on fp32 linspace(1, 1e-3, steps + 1); all at the end."""
    sched = BlockDiffusionScheduler(schedule="dream", mask_token_id=MASK)
    x = torch.full((1, n), MASK)
    outs = run_block(sched, logits_for(torch.ones(1, n, dtype=torch.long), torch.full((1, n), 0.9)), x, steps=steps)
    t = torch.linspace(1, 1e-3, steps + 1)
    want, left = [], n
    for i in range(steps):
        k = int(torch.tensor(float(left)) * (1 - t[i + 1] / t[i])) if i < steps - 1 else left
        want.append(k)
        left -= k
    assert counts(outs) == want
    if expected is not None:
        assert want == expected
    if (n, steps) == (16, 16):
        assert want[0] == 0  # Dream's first step reveals nothing here


def test_dream_schedule_is_per_row():
    sched = BlockDiffusionScheduler(schedule="dream", mask_token_id=MASK)
    sched.set_timesteps(4, 8)
    masked = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    assert sched.num_transfer(masked, 0).tolist() == [1, 0]
    assert sched.num_transfer(masked, 3).tolist() == [8, 4]  # the last step takes every mask left


def test_first_block_holding_the_prompt_keeps_the_whole_blocks_schedule():
    """Block 8, 4 steps, a 6-token prompt: the 2 masks go in the first step (counts [2, 2, 2, 2]
    capped at the masks left), and the block ends without a second step."""
    sched = BlockDiffusionScheduler(mask_token_id=MASK)
    x = torch.tensor([[1, 2, 3, 4, 5, 6, MASK, MASK]])
    outs = run_block(sched, logits_for(torch.full((1, 8), 7), torch.full((1, 8), 0.4)), x, steps=4)
    assert counts(outs) == [2] and outs[0].x[0, 6:].tolist() == [7, 7]
    assert outs[0].x[0, :6].tolist() == [1, 2, 3, 4, 5, 6]


def test_fixed_schedule_reads_no_mask_state():
    """A count rule alone in a fully masked block never looks at ``masked`` (no host sync):
    is_done works on a tensor without storage."""
    sched = BlockDiffusionScheduler(mask_token_id=MASK)
    sched.set_timesteps(4, 8, num_masked=8)
    meta = torch.ones(2, 8, dtype=torch.bool, device="meta")
    assert [sched.is_done(i, meta) for i in range(5)] == [False] * 4 + [True]
    with pytest.raises(Exception):
        sched.is_done(0, meta, x_changed=True)  # a callback changed x: now it must look


# ---------------------------------------------------------------------------------------------
# commit rules
# ---------------------------------------------------------------------------------------------
def test_confidence_rules_commit_the_most_confident():
    probs = torch.tensor([[0.3, 0.9, 0.5, 0.95, 0.2]])
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    x = torch.full((1, 5), MASK)
    sched = BlockDiffusionScheduler(mask_token_id=MASK)
    outs = run_block(sched, logits_for(tokens, probs), x, steps=2)
    assert counts(outs) == [3, 2]
    assert outs[0].transfer_index[0].tolist() == [False, True, True, True, False]
    torch.testing.assert_close(outs[0].confidence[0, 1:4], probs[0, 1:4].float())


def test_threshold_alone_commits_above_it_and_at_least_one():
    x = torch.full((1, 4), MASK)
    tokens = torch.tensor([[1, 2, 3, 4]])
    sched = BlockDiffusionScheduler(threshold=0.8, mask_token_id=MASK)
    out = run_block(sched, logits_for(tokens, torch.tensor([[0.9, 0.85, 0.5, 0.2]])), x)[0]
    assert out.transfer_index[0].tolist() == [True, True, False, False]
    outs = run_block(sched, logits_for(tokens, torch.full((1, 4), 0.5)), x)
    assert counts(outs) == [1, 1, 1, 1]


def test_threshold_with_a_schedule_is_sdars_dynamic_rule():
    x = torch.full((1, 6), MASK)
    tokens = torch.arange(1, 7)[None]
    probs = torch.tensor([[0.95, 0.96, 0.97, 0.1, 0.2, 0.3]])
    sched = BlockDiffusionScheduler(threshold=0.9, mask_token_id=MASK)
    outs = run_block(sched, logits_for(tokens, probs), x, steps=3)
    assert counts(outs) == [3, 2, 1]  # three pass (>= the count 2); then the top-2; then the last


def test_factor_rule():
    x = torch.full((1, 4), MASK)
    sched = BlockDiffusionScheduler(factor=1.0, mask_token_id=MASK)
    # bars 1 - 1/(n+1): rank 2 needs 0.667, rank 3 needs 0.75
    out = run_block(sched, logits_for(torch.arange(1, 5)[None], torch.tensor([[0.9, 0.7, 0.6, 0.5]])), x)[0]
    assert out.transfer_index[0].tolist() == [True, True, False, False]


def test_sequential_commits_from_the_first_mask():
    sched = BlockDiffusionScheduler(remasking="sequential", mask_token_id=MASK)
    x = torch.tensor([[5, MASK, MASK, MASK, MASK, MASK]])
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    outs = run_block(sched, logits_for(tokens, torch.tensor([[0.9, 0.2, 0.25, 0.99, 0.3, 0.4]])), x, steps=3)
    assert [o.transfer_index[0].nonzero().flatten().tolist() for o in outs] == [[1, 2], [3, 4], [5]]
    # a hole left by a predicted mask id: the range from the first mask re-writes what lies in it (as SDAR)
    sched.set_timesteps(2, 6)
    x = torch.tensor([[5, 6, MASK, 2, MASK, MASK]])
    out = sched.step(logits_for(tokens, torch.full((1, 6), 0.5)), x, x == MASK, 0, backend="torch")
    assert out.transfer_index[0].tolist() == [False, False, True, True, True, False]
    assert out.x[0].tolist() == [5, 6, 3, 4, 5, MASK]


def test_a_committed_mask_id_stays_a_mask():
    sched = BlockDiffusionScheduler(mask_token_id=MASK)
    x = torch.full((1, 4), MASK)
    tokens = torch.tensor([[MASK, 2, 3, 4]])
    outs = run_block(sched, logits_for(tokens, torch.tensor([[0.99, 0.5, 0.4, 0.3]])), x, steps=2)
    assert counts(outs) == [2, 2]  # LLaDA's fixed count: the mask "commit" is wasted
    assert outs[-1].x[0].tolist() == [MASK, 2, 3, MASK]
    suppressed = run_block(sched, logits_for(tokens, torch.tensor([[0.99, 0.5, 0.4, 0.3]])), x, steps=2,
                           suppress_tokens=[MASK])
    assert not (suppressed[-1].x == MASK).any()


def test_origin_reveals_with_probability_one_minus_s_over_t():
    rows, n, steps = 4000, 4, 4
    sched = BlockDiffusionScheduler(schedule="dream", remasking="origin", mask_token_id=MASK)
    sched.set_timesteps(steps, n)
    x = torch.full((rows, n), MASK)
    logits = logits_for(torch.full((rows, n), 3), torch.full((rows, n), 0.9))
    out = sched.step(logits, x, x == MASK, 0, temperature=0.0, seed=1, backend="torch", suppress_tokens=[MASK])
    t = torch.linspace(1, 1e-3, steps + 1)
    p = float(1 - t[1] / t[0])
    revealed = int(out.transfer_index.sum())
    assert abs(revealed / (rows * n) - p) < 4 * math.sqrt(p * (1 - p) / (rows * n))
    assert set(out.x[out.transfer_index].tolist()) == {3}
    last = sched.step(logits, x, x == MASK, steps - 1, temperature=0.0, seed=1, backend="torch")
    assert bool(last.transfer_index.all())  # the last step reveals every mask
    # the mask id may be drawn, as in Dream: the position stays masked
    favour_mask = logits_for(torch.full((1, n), MASK), torch.full((1, n), 0.99))
    drawn = sched.step(favour_mask, x[:1], x[:1] == MASK, steps - 1, temperature=0.0, backend="torch")
    assert bool(drawn.transfer_index.all()) and bool((drawn.x == MASK).all())


def test_selection_temperature_samples_positions_without_replacement():
    """Dream's alg_temp: k positions drawn as multinomial(softmax(confidence / τ), k)."""
    rows, tau = 3000, 0.5
    probs = torch.tensor([0.2, 0.5, 0.3, 0.9])
    sched = BlockDiffusionScheduler(selection_temperature=tau, mask_token_id=MASK)
    sched.set_timesteps(4, 4)  # one position per step
    x = torch.full((rows, 4), MASK)
    logits = logits_for(torch.full((rows, 4), 2), probs.expand(rows, 4))
    out = sched.step(logits, x, x == MASK, 0, seed=5, backend="torch")
    assert out.transfer_index.sum(1).tolist() == [1] * rows
    want = torch.softmax(probs.double() / tau, 0)
    got = out.transfer_index.sum(0).double()
    assert scipy_stats.chisquare(got.numpy(), (want * rows).numpy()).pvalue > 1e-3
    # k = 2: the pair frequencies of sampling without replacement
    sched.set_timesteps(2, 4)
    pairs = sched.step(logits, x, x == MASK, 0, seed=6, backend="torch").transfer_index
    assert pairs.sum(1).tolist() == [2] * rows
    w = want.tolist()
    expect = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            if i != j:
                expect[i, j] = w[i] * w[j] / (1 - w[i])
    pair_prob = expect + expect.T
    codes = [tuple(r.nonzero().flatten().tolist()) for r in pairs]
    observed = torch.tensor([[codes.count((i, j)) for j in range(4)] for i in range(4)], dtype=torch.float64)
    iu = torch.triu_indices(4, 4, 1)
    assert scipy_stats.chisquare(observed[iu[0], iu[1]].numpy(),
                                 (pair_prob[iu[0], iu[1]] * rows).numpy()).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# editing and stopping
# ---------------------------------------------------------------------------------------------
def test_editing_rewrites_confident_disagreements_and_post_steps_end():
    sched = BlockDiffusionScheduler(threshold=0.5, editing_threshold=0.8, max_post_steps=3, mask_token_id=MASK)
    x = torch.tensor([[7, 6, MASK, MASK]])
    generated = torch.tensor([[False, True, True, True]])  # column 0 is prompt
    tokens = torch.tensor([[5, 5, 2, 3]])
    logits = logits_for(tokens, torch.tensor([[0.95, 0.9, 0.9, 0.3]]))
    sched.set_timesteps(None, 4)
    out = sched.step(logits, x, x == MASK, 0, generated=generated, backend="torch")
    assert out.edit_index[0].tolist() == [False, True, False, False]  # not the prompt column
    assert out.transfer_index[0].tolist() == [False, False, True, False]
    assert out.x[0].tolist() == [7, 5, 2, MASK]
    # post steps: once no mask is left, a step that edits nothing ends the block
    steps, last, x = 0, None, out.x
    sched.set_timesteps(None, 4)
    while not sched.is_done(steps, x == MASK, last):
        last = sched.step(logits, x, x == MASK, steps, generated=generated, backend="torch")
        x, steps = last.x, steps + 1
    assert steps == 2 and x[0].tolist() == [7, 5, 2, 3]  # the last mask, then a post step without edits
    flip = logits_for(torch.tensor([[5, 1, 2, 3]]), torch.full((1, 4), 0.95))
    flop = logits_for(torch.tensor([[5, 4, 2, 3]]), torch.full((1, 4), 0.95))
    sched.set_timesteps(None, 4)
    steps, last = 0, None
    while not sched.is_done(steps, x == MASK, last):
        last = sched.step(flip if steps % 2 else flop, x, x == MASK, steps, generated=generated, backend="torch")
        x, steps = last.x, steps + 1
    assert steps == 3  # max_post_steps bounds an edit that never settles


def test_masked_steps_are_capped():
    """threshold alone stops after block_length steps (a model that keeps predicting the mask id
    would loop forever upstream); threshold + steps after the steps."""
    x = torch.full((1, 3), MASK)
    always_mask = logits_for(torch.full((1, 3), MASK), torch.full((1, 3), 0.99))
    assert len(run_block(BlockDiffusionScheduler(threshold=0.5, mask_token_id=MASK), always_mask, x)) == 3
    assert len(run_block(BlockDiffusionScheduler(threshold=0.5, mask_token_id=MASK), always_mask, x, steps=2)) == 2


def test_output_fields_and_config_roundtrip(tmp_path):
    sched = BlockDiffusionScheduler(schedule="dream", remasking="entropy", confidence_from="sampling",
                                    threshold=0.7, mask_token_id=MASK)
    sched.save_config(tmp_path)
    again = BlockDiffusionScheduler.from_config(tmp_path)
    assert again.config == sched.config and again.replace(threshold=None).threshold is None
    sched.set_timesteps(2, 3)
    x = torch.full((2, 3), MASK)
    out = sched.step(logits_for(torch.ones(2, 3, dtype=torch.long), torch.full((2, 3), 0.5)), x, x == MASK, 0,
                     backend="torch")
    assert isinstance(out, BlockDiffusionSchedulerOutput)
    assert out.x.shape == out.tokens.shape == out.confidence.shape == out.transfer_index.shape == (2, 3)
    assert out.edit_index.dtype == torch.bool and not out.edit_index.any()
    assert sched.timesteps.dtype == torch.float32 and sched.timesteps[-1].item() == pytest.approx(1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="cosine"), "schedule"),
    (dict(remasking="lowest"), "remasking"),
    (dict(threshold=1.5), "threshold"),
    (dict(factor=1.0, threshold=0.5), "cannot be combined"),
    (dict(max_post_steps=2), "editing_threshold"),
    (dict(remasking="origin", threshold=0.5), "cannot take"),
    (dict(selection_temperature=1.0, factor=1.0), "cannot take"),
    (dict(remasking="sequential", selection_temperature=1.0), "uses none"),
    (dict(remasking="origin", editing_threshold=0.5), "origin"),
    (dict(eps=0.0), "eps"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockDiffusionScheduler(**kwargs)


def test_bad_timesteps_raise():
    with pytest.raises(ValueError, match="no commit rule"):
        BlockDiffusionScheduler().set_timesteps(None, 4)
    with pytest.raises(ValueError, match="takes no step count"):
        BlockDiffusionScheduler(factor=1.0).set_timesteps(2, 4)
    with pytest.raises(ValueError, match="step count"):
        BlockDiffusionScheduler(remasking="sequential", threshold=None).set_timesteps(None, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        BlockDiffusionScheduler(mask_token_id=MASK).is_done(0, torch.ones(1, 2, dtype=torch.bool))
