"""Hostile inputs to the pipelines (issue 17, pipeline items 2, 5, 6, 11, 12, 16, 17, 22, 23, 24).

Tiny models only (CPU; Triton interpreted): the tiny Qwen3 of ``tests/tiny_qwen3.py`` (an
embedding that raises on an id outside ``[0, 96)``), the tiny token-diffusion checkpoints of
``tests/assets`` and stand-in models whose logits hold NaN where a test puts it.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import ddiff
from tiny_qwen3 import MASK, VOCAB, tiny_target
from ddiff.pipelines import BlockDiffusionPipeline, DFlashDraftModel, DFlashPipeline, TokenDiffusionPipeline

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BACKENDS = ["torch", "triton"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# models and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target():
    return tiny_target(dtype=torch.float32)


@pytest.fixture(scope="module")
def mdlm():
    return TokenDiffusionPipeline.from_pretrained(os.path.join(ASSETS, "tiny_token_mdlm"), backend="torch")


def block_pipe(model, **kwargs):
    kwargs.setdefault("mask_token_id", MASK)
    kwargs.setdefault("backend", "torch")
    return BlockDiffusionPipeline(model, **kwargs)


def dflash_pipe(target, backend="torch"):
    torch.manual_seed(1)
    draft = DFlashDraftModel.from_target_config(target.config, 1, block_size=4, mask_token_id=MASK,
                                                target_layer_ids=[0, 1]).to(target.dtype).eval()
    return DFlashPipeline(draft, target, backend=backend)


class Stub(torch.nn.Module):
    """A bidirectional stand-in model with an embedding (ids outside ``[0, vocab)`` raise): fixed
    random logits ``[B, T, V]``, NaN at the ``(batch, position)`` pairs of ``nan_at``."""

    def __init__(self, vocab: int, nan_at=(), positions: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=positions)
        self.embed = torch.nn.Embedding(vocab, 1)
        self.vocab, self.nan_at, self.calls = vocab, list(nan_at), 0

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        self.embed(input_ids)  # IndexError on an invalid id, as a real model's embedding
        self.calls += 1
        B, T = input_ids.shape
        logits = torch.randn(B, T, self.vocab, generator=torch.Generator().manual_seed(0))
        for b, l in self.nan_at:
            logits[b, l] = float("nan")
        return SimpleNamespace(logits=logits)


@pytest.fixture
def checks_off_in_token_diffusion(monkeypatch):
    """Run TokenDiffusionPipeline's loop without the ops' value checks, as it does on CUDA."""
    import ddiff.pipelines.token_diffusion as module

    monkeypatch.setattr(module, "sync_checks", lambda enabled: ddiff.sync_checks(False))


def _poison_rows(model, row, from_call):
    """A forward hook making every logit of batch row ``row`` NaN from the ``from_call``-th call on."""
    calls = {"n": 0}

    def hook(module, args, kwargs, output):
        calls["n"] += 1
        if calls["n"] > from_call:
            output.logits[row] = float("nan")
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def _no_invalid_ids(model):
    """A pre-hook on the input embedding asserting it never receives an id outside the vocabulary."""
    embedding = model.get_input_embeddings()
    size = embedding.num_embeddings

    def pre(module, args):
        ids = args[0]
        assert int(ids.min()) >= 0 and int(ids.max()) < size, f"an invalid id reached the model: {ids.tolist()}"

    return embedding.register_forward_pre_hook(pre)


# ---------------------------------------------------------------------------------------------
# item 2: every pipeline raises on invalid logits rows, also with the checks off (uniform, hybrid)
# ---------------------------------------------------------------------------------------------
def _flagging_udlm_step(real):
    """``ddiff.udlm_step`` as the ops flag invalid rows with the checks off: -1 there."""

    def step(logits, x_t, *args, **kwargs):
        out = real(logits, x_t, *args, **kwargs)
        bad = ~torch.isfinite(logits.float().amax(-1))
        return torch.where(bad, torch.full_like(out, -1), out)

    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_pipeline_raises_on_flagged_rows_with_checks_off(monkeypatch, checks_off_in_token_diffusion,
                                                                   backend):
    """Item 2 (pipeline part): a row the op flags (-1) raises the step / batch / position; the
    uniform process used to be checked only after the loop, and only for the absorbing process."""
    monkeypatch.setattr(ddiff, "udlm_step", _flagging_udlm_step(ddiff.udlm_step))
    pipe = TokenDiffusionPipeline(Stub(11, [(1, 6)]), process="uniform", mask_token_id=None, vocab_size=11,
                                  backend=backend)
    with pytest.raises(ValueError, match=r"at step 0, .* at batch 1, position 6 held NaN"):
        pipe(batch_size=2, seq_len=8, num_inference_steps=3, seed=0, progress=False, output_type="ids")


@pytest.mark.parametrize("top_p", [None, 0.9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_pipeline_raises_on_nan_logits_with_the_real_ops(checks_off_in_token_diffusion, backend, top_p):
    """Item 2 end to end: ``ddiff.udlm_step`` flags invalid rows with the checks off (the ops'
    side), and the pipeline raises on them: NaN logits never come back as random tokens."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 0] = float("nan")
    with ddiff.sync_checks(False):
        flagged = ddiff.udlm_step(logits, torch.zeros(1, 2, dtype=torch.long), 0.5, 0.9, seed=0, backend=backend)
    assert int(flagged[0, 1]) == -1 and int(flagged[0, 0]) >= 0
    pipe = TokenDiffusionPipeline(Stub(11, [(1, 6)]), process="uniform", mask_token_id=None, vocab_size=11,
                                  backend=backend)
    with pytest.raises(ValueError, match=r"at step 0, .* at batch 1, position 6 held NaN"):  # top_p: filter_logits
        pipe(batch_size=2, seq_len=8, num_inference_steps=3, seed=0, progress=False, output_type="ids", top_p=top_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_pipeline_raises_on_nan_logits_with_checks_off(checks_off_in_token_diffusion, backend):
    """The hybrid step's -1 (an invalid x̂_0 draw or NaN posterior weights) used to be written into
    the sequence and fed to the model (IndexError) or returned."""
    model = Stub(11, [(0, 2)])
    pipe = TokenDiffusionPipeline(model, process="hybrid", mask_token_id=10, vocab_size=11, backend=backend)
    with pytest.raises(ValueError, match=r"at step \d+, .* at batch 0, position 2 held NaN"):
        pipe(batch_size=1, seq_len=4, num_inference_steps=4, seed=0, progress=False, output_type="ids")


# ---------------------------------------------------------------------------------------------
# item 5: non-integer attention masks and fixed ids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.5, float("nan"), 2.0])
def test_fractional_attention_mask_is_refused(target, bad):
    pipe = block_pipe(target)
    ids = torch.tensor([[1, 5, 2, 7]])
    with pytest.raises(ValueError, match="`attention_mask` must hold only 0 and 1"):
        pipe(input_ids=ids, attention_mask=torch.tensor([[bad, 1.0, 1.0, 1.0]]), max_new_tokens=2, block_length=2,
             progress=False, output_type="ids")
    # a float mask of exact zeros and ones is still a mask
    out = pipe(input_ids=ids, attention_mask=torch.tensor([[0.0, 1.0, 1.0, 1.0]]), max_new_tokens=2,
               block_length=2, progress=False, output_type="ids")
    assert out.sequences.shape == (1, 2)


@pytest.mark.parametrize("name, kwargs", [
    ("prefix_ids", dict(prefix_ids=[1.5])),
    ("prefix_ids", dict(prefix_ids=[[1, 2.0]])),
    ("infill_ids", dict(infill_mask=torch.tensor([[True, False, True, True]]), infill_ids=[[0, 3.7, 0, 0]])),
])
def test_fractional_fixed_ids_are_refused(mdlm, name, kwargs):
    with pytest.raises(TypeError, match=f"`{name}` must hold integer token ids"):
        mdlm(batch_size=1, seq_len=4, num_inference_steps=2, seed=0, progress=False, output_type="ids", **kwargs)
    out = mdlm(batch_size=1, seq_len=4, num_inference_steps=2, seed=0, progress=False, output_type="ids",
               prefix_ids=[1])
    assert out.sequences[0, 0] == 1


# ---------------------------------------------------------------------------------------------
# item 6: context length and the checkpoint's vocabulary
# ---------------------------------------------------------------------------------------------
def test_token_diffusion_seq_len_beyond_the_context_is_refused(mdlm):
    assert mdlm.model.config.max_position_embeddings == 64
    with pytest.raises(ValueError, match=r"`seq_len` \(200\) exceeds the model's context of 64"):
        mdlm(batch_size=1, seq_len=200, num_inference_steps=1, seed=0, progress=False, output_type="ids")
    assert mdlm(batch_size=1, seq_len=64, num_inference_steps=1, seed=0, progress=False,
                output_type="ids").sequences.shape == (1, 64)


def _small_scheduler_checkpoint(tmp_path, tokenizer: bool):
    path = tmp_path / ("with_tok" if tokenizer else "no_tok")
    shutil.copytree(os.path.join(ASSETS, "tiny_token_mdlm"), path)
    config = json.loads((path / "scheduler_config.json").read_text())
    config.update(vocab_size=6, mask_token_id=5)
    (path / "scheduler_config.json").write_text(json.dumps(config))
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()
    return str(path)


def test_from_pretrained_refuses_a_scheduler_vocabulary_that_is_not_the_tokenizers(tmp_path):
    path = _small_scheduler_checkpoint(tmp_path, tokenizer=True)
    with pytest.raises(ValueError, match=r"scheduler_config.json: vocab_size=6 but the checkpoint's tokenizer has 11"):
        TokenDiffusionPipeline.from_pretrained(path, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_past_the_process_vocabulary_are_never_sampled(tmp_path, backend):
    """Without a tokenizer a smaller scheduler vocabulary is allowed (the model's head may be
    padded), but the columns past it are never sampled (they gave ids 6, 7 and 10)."""
    pipe = TokenDiffusionPipeline.from_pretrained(_small_scheduler_checkpoint(tmp_path, tokenizer=False),
                                                  backend=backend)
    assert pipe.scheduler.vocab_size == 6
    out = pipe(batch_size=4, seq_len=16, num_inference_steps=4, seed=0, progress=False, output_type="ids")
    assert int(out.sequences.max()) < 6


# ---------------------------------------------------------------------------------------------
# item 11: invalid logits inside BlockDiffusionPipeline
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_block_diffusion_invalid_logits_raise_naming_step_row_and_position(target, backend, attention):
    """The -1 of an invalid row used to be written into the sequence and reach the embedding."""
    pipe = block_pipe(target, backend=backend, attention=attention)
    ids = torch.tensor([[1, 5, 2, 7], [3, 4, 6, 8]])
    handles = [_poison_rows(target, row=1, from_call=1), _no_invalid_ids(target)]
    try:
        with pytest.raises(ValueError, match=r"at step 1, .* token at batch 1, position [45] of the sequence"):
            pipe(input_ids=ids, max_new_tokens=4, block_length=2, progress=False, output_type="ids")
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kwargs, match", [
    (dict(suppress_tokens=list(range(VOCAB))), f"`suppress_tokens` covers all {VOCAB} ids"),
    (dict(cfg_scale=float("inf")), "`cfg_scale` must be a finite number"),
])
def test_block_diffusion_rules_that_can_draw_no_token_are_refused(target, kwargs, match):
    pipe = block_pipe(target)
    with pytest.raises(ValueError, match=match):
        pipe(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=2, block_length=2, progress=False, **kwargs)


def test_block_diffusion_tiny_temperature_never_feeds_an_invalid_id(target):
    """``temperature=1e-50`` overflows the torch backend's division (its rows are invalid): either
    the documented ValueError or valid tokens (the ops' temperature rule), never an IndexError."""
    pipe = block_pipe(target)
    handle = _no_invalid_ids(target)
    try:
        out = pipe(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=4, block_length=2, temperature=1e-50,
                   seed=0, progress=False, output_type="ids")
    except ValueError as error:
        assert "at step 0" in str(error)
    else:
        assert int(out.sequences.min()) >= 0 and int(out.sequences.max()) < VOCAB
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# item 12: a DFlash draft that produces NaN only slows decoding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dflash_nan_draft_proposals_are_rejected(target, backend):
    pipe = dflash_pipe(target, backend=backend)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    kw = dict(input_ids=ids, max_new_tokens=6, progress=False, output_type="ids", stop_token_ids=[])
    alone = pipe(block_size=1, **kw).sequences

    def nan_hidden(module, args, kwargs, output):
        return torch.full_like(output, float("nan"))

    handles = [pipe.draft_model.register_forward_hook(nan_hidden, with_kwargs=True), _no_invalid_ids(target)]
    try:
        out = pipe(**kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out.sequences, alone)  # lossless: the target's own greedy tokens
    assert out.acceptance_lengths == [1] * 5  # every proposal rejected, the target's bonus token kept


# ---------------------------------------------------------------------------------------------
# item 16: empty batch
# ---------------------------------------------------------------------------------------------
def test_block_diffusion_empty_batch_returns_empty_results(target):
    pipe = block_pipe(target)
    calls = []
    handle = target.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = pipe(input_ids=torch.zeros(0, 3, dtype=torch.long), max_new_tokens=4, block_length=2, progress=False,
                   output_type="ids")
    finally:
        handle.remove()
    assert out.sequences.shape == (0, 4) and out.sequences.dtype == torch.int64
    assert out.finished.shape == (0,) and out.nfe == 0 and out.steps == 0 and not calls
    with_tokenizer = block_pipe(target, tokenizer=SimpleNamespace(mask_token_id=MASK, eos_token_id=None))
    out = with_tokenizer(prompt=[], max_new_tokens=3, block_length=2, progress=False, output_type="ids")
    assert out.sequences.shape == (0, 3)
    # an empty batch is what the ops return for empty logits
    assert ddiff.sample(torch.zeros(0, VOCAB), seed=0, backend="torch").shape == (0,)


# ---------------------------------------------------------------------------------------------
# item 17: TokenDiffusionPipeline stops once nothing can change
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, steps", [("torch", 2000), ("triton", 120)])
def test_absorbing_stops_once_every_position_is_decoded(backend, steps):
    pipe = TokenDiffusionPipeline(Stub(11), process="absorbing", mask_token_id=10, vocab_size=11, backend=backend)
    masks = []

    def count(p, step, t, kw):
        masks.append(int((kw["x"] == 10).sum()))

    out = pipe(batch_size=1, seq_len=4, num_inference_steps=steps, seed=0, progress=False, output_type="ids",
               callback_on_step_end=count)
    assert int((out.sequences == 10).sum()) == 0
    assert masks[-1] == 0 and all(m > 0 for m in masks[:-1])  # the last step taken revealed the last mask
    assert out.steps == len(masks) < steps


@pytest.mark.parametrize("block_size", [None, 2])
def test_absorbing_block_stops_early_and_the_next_block_runs(block_size):
    pipe = TokenDiffusionPipeline(Stub(11), process="absorbing", mask_token_id=10, vocab_size=11, backend="torch")
    out = pipe(batch_size=2, seq_len=4, num_inference_steps=400, block_size=block_size, seed=1, progress=False,
               output_type="ids")
    assert int((out.sequences == 10).sum()) == 0 and out.steps < 400


@pytest.mark.parametrize("block_size", [None, 2])
def test_early_stop_changes_no_token(monkeypatch, block_size):
    """Later blocks draw at their scheduled offsets: the tokens are those of a run that steps on."""
    pipe = TokenDiffusionPipeline(Stub(11), process="absorbing", mask_token_id=10, vocab_size=11, backend="torch")
    call = dict(batch_size=2, seq_len=8, num_inference_steps=200, block_size=block_size, seed=3, progress=False,
                output_type="ids")
    stopped = pipe(**call)
    commit = TokenDiffusionPipeline._commit

    def never_done(self, *args):
        x, logits, _ = commit(self, *args)
        return x, logits, True

    monkeypatch.setattr(TokenDiffusionPipeline, "_commit", never_done)
    full = pipe(**call)
    assert full.steps == 200 and stopped.steps < 200 and stopped.nfe <= full.nfe
    assert torch.equal(stopped.sequences, full.sequences)


def test_uniform_runs_every_step():
    """Documented rule: uniform / hybrid tokens may change at any step until t = 0."""
    pipe = TokenDiffusionPipeline(Stub(11), process="uniform", vocab_size=11, backend="torch")
    assert pipe(batch_size=1, seq_len=4, num_inference_steps=30, seed=0, progress=False,
                output_type="ids").steps == 30


# ---------------------------------------------------------------------------------------------
# item 22: ids outside the vocabulary under attention_mask = 0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [-1, -100])
def test_negative_padding_ids_are_refused(target, pad):
    pipe = block_pipe(target)
    ids, mask = torch.tensor([[pad, pad, 5], [3, 6, 4]]), torch.tensor([[0, 0, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match=rf"`input_ids` holds token id {pad} at batch 0, position 0"):
        pipe(input_ids=ids, attention_mask=mask, max_new_tokens=2, block_length=2, progress=False)


# ---------------------------------------------------------------------------------------------
# item 23: the x a callback returns
# ---------------------------------------------------------------------------------------------
def _bad_x(kind):
    def callback(pipe, step, t, kw):
        x = kw["x"]
        if kind == "float":
            return {"x": x.float()}
        if kind == "list":
            return {"x": x.tolist()}
        if kind == "shape":
            return {"x": x[:, :-1]}
        if kind == "bool":
            return {"x": x > 0}
        bad = x.clone()
        bad[0, -1] = 1000 if kind == "large" else -1
        return {"x": bad}

    return callback


CALLBACK_CASES = [("float", TypeError, "must hold integer token ids"), ("bool", TypeError, "integer token ids"),
                  ("list", TypeError, "must be a torch.Tensor"), ("shape", ValueError, "must have the shape of `x`"),
                  ("large", ValueError, r"`x` holds token id 1000 at batch 0"),
                  ("negative", ValueError, r"`x` holds token id -1 at batch 0")]


@pytest.mark.parametrize("kind, exc, match", CALLBACK_CASES)
def test_block_diffusion_callback_x_is_validated(target, kind, exc, match):
    pipe = block_pipe(target)
    with pytest.raises(exc, match=match):
        pipe(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=4, block_length=2, progress=False,
             output_type="ids", callback_on_step_end=_bad_x(kind))


@pytest.mark.parametrize("kind, exc, match", CALLBACK_CASES)
def test_token_diffusion_callback_x_is_validated(mdlm, kind, exc, match):
    with pytest.raises(exc, match=match):
        mdlm(batch_size=1, seq_len=4, num_inference_steps=3, seed=0, progress=False, output_type="ids",
             callback_on_step_end=_bad_x(kind))


def test_callback_returning_none_or_a_valid_x_still_works(target, mdlm):
    def keep(pipe, step, t, kw):
        return {"x": kw["x"].clone()}

    out = block_pipe(target)(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=4, block_length=2,
                             progress=False, output_type="ids", callback_on_step_end=keep)
    assert out.sequences.shape == (1, 4)
    out = mdlm(batch_size=1, seq_len=4, num_inference_steps=3, seed=0, progress=False, output_type="ids",
               callback_on_step_end=lambda *a: {"x": None})
    assert out.sequences.shape == (1, 4)


# ---------------------------------------------------------------------------------------------
# item 24: suppress_tokens outside the vocabulary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, VOCAB, 5000])
def test_block_diffusion_suppress_tokens_out_of_range(target, backend, bad):
    pipe = block_pipe(target, backend=backend)
    with pytest.raises(ValueError, match=rf"`suppress_tokens` holds token id {bad}, outside the model's logits "
                                         rf"\[0, {VOCAB}\)"):
        pipe(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=2, block_length=2, progress=False,
             suppress_tokens=[3, bad])


def test_block_diffusion_confidence_eos_ids_out_of_range(target):
    pipe = block_pipe(target)
    with pytest.raises(ValueError, match=r"`eos_token_id` holds token id 5000"):
        pipe(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=2, block_length=2, progress=False,
             eos_token_id=[4, 5000], confidence_eos_eot_inf=True)
