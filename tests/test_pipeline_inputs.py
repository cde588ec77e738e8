"""Pipeline inputs (issue 16, part 4) on tiny models (CPU; Triton interpreted).

* Token ids outside the model's vocabulary (``>= V`` or negative) raise a ValueError naming the
  argument, before any model call: ``input_ids`` / ``prompt`` of BlockDiffusionPipeline and
  DFlashPipeline, ``prefix_ids`` / ``infill_ids`` of TokenDiffusionPipeline (which has no
  ``input_ids``).
* ``process="uniform"`` with ``mask_token_id=None`` has no mask token, whatever the tokenizer has.
* BlockDiffusionPipeline's default commit rule is LLaDA's ``steps_per_block = block_length``.
* NaN in 3-D logits: the ops name the batch index and the position on both backends, and so do
  the pipelines for a model whose logits hold NaN at a known place.
"""

from __future__ import annotations

import os
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
# helpers
# ---------------------------------------------------------------------------------------------
def word_tokenizer(num_words: int, mask: bool = True):
    """A whitespace tokenizer: '<pad>' 0, '<s>' 1, '<mask>' 2, then 'w0', 'w1', ... ('wK' is id K + 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "<mask>"] + [f"w{i}" for i in range(num_words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"mask_token": "<mask>"} if mask else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", **extra)


@pytest.fixture(scope="module")
def target():
    return tiny_target(dtype=torch.float32)


def block_pipe(model, **kwargs):
    kwargs.setdefault("mask_token_id", MASK)
    kwargs.setdefault("backend", "torch")
    return BlockDiffusionPipeline(model, **kwargs)


def dflash_pipe(target, tokenizer=None):
    torch.manual_seed(1)
    draft = DFlashDraftModel.from_target_config(target.config, 1, block_size=4, mask_token_id=MASK,
                                                target_layer_ids=[0, 1]).to(target.dtype).eval()
    return DFlashPipeline(draft, target, tokenizer, backend="torch")


@pytest.fixture(scope="module")
def mdlm():
    return TokenDiffusionPipeline.from_pretrained(os.path.join(ASSETS, "tiny_token_mdlm"), backend="torch")


@pytest.fixture(scope="module")
def udlm():
    return TokenDiffusionPipeline.from_pretrained(os.path.join(ASSETS, "tiny_token_udlm"), backend="torch")


class NaNAt(torch.nn.Module):
    """A bidirectional stand-in model: fixed random logits ``[B, T, V]`` with NaN at ``(b, l)``."""

    def __init__(self, vocab: int, b: int, l: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.vocab, self.b, self.l = vocab, b, l

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(B, T, self.vocab, generator=g)
        logits[self.b, self.l, 0] = float("nan")
        return SimpleNamespace(logits=logits)


# ---------------------------------------------------------------------------------------------
# token ids outside the vocabulary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -1])
def test_block_diffusion_input_ids_out_of_vocabulary(target, bad):
    pipe = block_pipe(target)
    ids = torch.tensor([[1, 5, 2], [3, bad, 4]])
    with pytest.raises(ValueError, match=rf"`input_ids` holds token id {bad} at batch 1, position 1"):
        pipe(input_ids=ids, max_new_tokens=2, block_length=2, progress=False)
    with pytest.raises(ValueError, match="`input_ids`"):  # 1-D prompt
        pipe(input_ids=ids[1], max_new_tokens=2, block_length=2, progress=False)


def test_block_diffusion_padding_ids_are_checked_too(target):
    """Left padding reaches the model's embedding (it is only masked out of attention)."""
    pipe = block_pipe(target)
    ids, mask = torch.tensor([[VOCAB, 5, 2], [3, 6, 4]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="`input_ids` holds token id 96 at batch 0, position 0"):
        pipe(input_ids=ids, attention_mask=mask, max_new_tokens=2, block_length=2, progress=False)
    ids[0, 0] = 0
    out = pipe(input_ids=ids, attention_mask=mask, max_new_tokens=2, block_length=2, progress=False,
               output_type="ids")
    assert out.sequences.shape == (2, 2)


def test_block_diffusion_prompt_list_out_of_vocabulary(target):
    tok = word_tokenizer(VOCAB + 5)  # ids up to VOCAB + 7: more than the model embeds
    pipe = block_pipe(target, tokenizer=tok)
    with pytest.raises(ValueError, match=rf"`prompt` holds token id {VOCAB + 1} at batch 1"):
        pipe(prompt=["w0 w1", f"w2 w{VOCAB - 2}"], max_new_tokens=2, block_length=2, progress=False)
    out = pipe(prompt=["w0 w1", "w2 w3 w4"], max_new_tokens=2, block_length=2, progress=False, output_type="ids")
    assert out.sequences.shape == (2, 2)


@pytest.mark.parametrize("bad", [VOCAB, -2])
def test_dflash_input_ids_out_of_vocabulary(target, bad):
    pipe = dflash_pipe(target)
    with pytest.raises(ValueError, match=rf"`input_ids` holds token id {bad} at batch 0, position 2.*\[0, {VOCAB}\)"):
        pipe(input_ids=torch.tensor([[1, 2, bad]]), max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="`input_ids`"):
        pipe(input_ids=torch.tensor([bad, 1]), max_new_tokens=2, progress=False)


def test_dflash_prompt_out_of_vocabulary(target):
    pipe = dflash_pipe(target, word_tokenizer(VOCAB + 5))
    with pytest.raises(ValueError, match=rf"`prompt` holds token id {VOCAB + 2}"):
        pipe(prompt=[f"w0 w{VOCAB - 1}"], max_new_tokens=2, progress=False, stop_token_ids=[])


@pytest.mark.parametrize("name, kwargs", [
    ("prefix_ids", dict(prefix_ids=[1, 11])),
    ("prefix_ids", dict(prefix_ids=torch.tensor([[2, -1]]))),
    ("infill_ids", dict(infill_mask=torch.tensor([[True, False, True, True]]),
                        infill_ids=torch.tensor([[0, 12, 0, 0]]))),
    ("infill_ids", dict(infill_mask=torch.tensor([[True, False, True, True]]),
                        infill_ids=torch.tensor([[0, -5, 0, 0]]))),
])
def test_token_diffusion_fixed_ids_out_of_vocabulary(mdlm, name, kwargs):
    """TokenDiffusionPipeline takes no ``input_ids``: its given tokens are ``prefix_ids`` / ``infill_ids``."""
    with pytest.raises(ValueError, match=rf"`{name}` holds token id -?\d+ at batch 0, position 1.*\[0, 11\)"):
        mdlm(batch_size=1, seq_len=4, num_inference_steps=2, seed=0, progress=False, output_type="ids", **kwargs)


def test_token_diffusion_ignores_infill_ids_at_generated_positions(mdlm):
    out = mdlm(batch_size=1, seq_len=4, num_inference_steps=2, seed=0, progress=False, output_type="ids",
               infill_mask=torch.tensor([[True, False, True, True]]), infill_ids=torch.tensor([[-7, 3, 99, 0]]))
    assert out.sequences[0, 1] == 3


def test_token_diffusion_vocab_size_beyond_the_model_is_refused(mdlm):
    with pytest.raises(ValueError, match="`vocab_size`.*11"):
        TokenDiffusionPipeline(mdlm.model, process="absorbing", mask_token_id=10, vocab_size=12)


# ---------------------------------------------------------------------------------------------
# uniform process: mask_token_id=None means no mask token
# ---------------------------------------------------------------------------------------------
def test_uniform_none_mask_ignores_the_tokenizers_mask(udlm):
    tok = udlm.tokenizer
    assert tok.mask_token_id == 10 and len(tok) == 11
    pipe = TokenDiffusionPipeline(udlm.model, tok, process="uniform", mask_token_id=None, backend="torch")
    assert pipe.mask_token_id is None and pipe.scheduler.mask_token_id is None
    assert pipe.scheduler.num_uniform_tokens == 11  # noise over every id, the tokenizer's [MASK] included
    prior = pipe.scheduler.sample_prior((4000,), generator=torch.Generator().manual_seed(0))
    assert set(prior.tolist()) == set(range(11))
    out = pipe(batch_size=2, seq_len=8, num_inference_steps=3, seed=0, progress=False, output_type="ids")
    assert out.sequences.shape == (2, 8)
    # the mask is still honoured when given explicitly (the trained checkpoint's config)
    assert udlm.mask_token_id == 10 and udlm.scheduler.num_uniform_tokens == 10
    explicit = TokenDiffusionPipeline(udlm.model, tok, process="uniform", mask_token_id=10, backend="torch")
    assert explicit.scheduler.num_uniform_tokens == 10
    # absorbing still takes the tokenizer's mask id
    assert TokenDiffusionPipeline(udlm.model, tok, process="absorbing").mask_token_id == 10


def test_uniform_none_mask_with_a_mid_vocabulary_tokenizer_mask(udlm):
    """A tokenizer mask id the uniform process could not exclude (not the last id) used to be
    imposed and then rejected with an error asking for ``mask_token_id=None``, which was given."""
    tok = type("StubTokenizer", (), {"mask_token_id": 3, "__len__": lambda self: 11})()
    pipe = TokenDiffusionPipeline(udlm.model, tok, process="uniform", backend="torch")
    assert pipe.mask_token_id is None and pipe.scheduler.num_uniform_tokens == 11
    out = pipe(batch_size=1, seq_len=6, num_inference_steps=2, seed=1, progress=False, output_type="ids")
    assert out.sequences.shape == (1, 6)
    with pytest.raises(ValueError, match="cannot use mask_token_id=3"):  # explicit: still rejected
        TokenDiffusionPipeline(udlm.model, tok, process="uniform", mask_token_id=3)


# ---------------------------------------------------------------------------------------------
# BlockDiffusionPipeline's default commit rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_block_diffusion_default_rule_is_llada_one_token_per_step(target, attention):
    pipe = block_pipe(target, attention=attention)
    ids = torch.tensor([[1, 5, 2, 7]])
    call = dict(input_ids=ids, max_new_tokens=6, block_length=4, temperature=0.0, progress=False, output_type="ids")
    default = pipe(**call)
    explicit = pipe(**call, steps_per_block=4)
    assert torch.equal(default.sequences, explicit.sequences)
    assert default.steps == explicit.steps and default.block_steps == explicit.block_steps
    # one token per step: a block of n generated positions takes n steps
    assert sum(default.block_steps) == 6
    # the other rules are untouched: a threshold alone is not given a count
    fast = pipe(**call, threshold=0.0)
    assert fast.steps < default.steps


# ---------------------------------------------------------------------------------------------
# NaN in 3-D logits
# ---------------------------------------------------------------------------------------------
def _nan_logits(shape=(2, 3, 8), at=(1, 2)):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    logits[at + (4,)] = float("nan")
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_name_batch_and_position_of_nan(backend):
    logits = _nan_logits()
    where = "`logits` at batch 1, position 2 contains NaN"
    with pytest.raises(ValueError, match=where):
        ddiff.predict_tokens(logits, backend=backend)
    with pytest.raises(ValueError, match=where):
        ddiff.predict_tokens(logits, temperature=0.7, top_k=3, seed=0, backend=backend)
    masks = torch.full((2, 3), 7, dtype=torch.int64)
    with pytest.raises(ValueError, match=where):
        ddiff.mdlm_step(logits, masks, 7, 0.0, 1.0, seed=0, backend=backend)
    with pytest.raises(ValueError, match=where):
        ddiff.udlm_step(logits, torch.zeros(2, 3, dtype=torch.int64), 0.2, 0.6, seed=0, backend=backend)
    with pytest.raises(ValueError, match=where):
        ddiff.sample(logits, seed=0, backend=backend)
    with pytest.raises(ValueError, match=where):
        ddiff.filter_logits(logits, top_k=2, backend=backend)
    # 2-D logits keep the row; more leading dims give the full index
    with pytest.raises(ValueError, match="`logits` row 5 contains NaN"):
        ddiff.sample(logits.reshape(6, 8), seed=0, backend=backend)
    with pytest.raises(ValueError, match=r"`logits` at index \(1, 0, 2\) contains NaN"):
        ddiff.predict_tokens(logits.reshape(2, 1, 3, 8), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b, l", [(1, 5), (0, 3)])
def test_block_diffusion_names_the_nan_position(backend, b, l):
    pipe = BlockDiffusionPipeline(NaNAt(16, b, l), mask_token_id=15, backend=backend)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=rf"at batch {b}, position {l} of the sequence"):
        pipe(input_ids=ids, max_new_tokens=4, block_length=2, progress=False, output_type="ids")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 4])
def test_token_diffusion_names_the_nan_position(backend, block_size):
    pipe = TokenDiffusionPipeline(NaNAt(11, 1, 6), process="absorbing", mask_token_id=10, backend=backend)
    with pytest.raises(ValueError, match="at batch 1, position 6 "):
        pipe(batch_size=2, seq_len=8, num_inference_steps=2, block_size=block_size, seed=0, progress=False,
             output_type="ids")


def test_token_diffusion_end_of_loop_check_names_the_position(monkeypatch):
    """Without the ops' value checks (what the loop does on CUDA) the position left masked is
    reported after the loop."""
    import ddiff.pipelines.token_diffusion as module

    monkeypatch.setattr(module, "sync_checks", lambda enabled: ddiff.sync_checks(False))
    pipe = TokenDiffusionPipeline(NaNAt(11, 1, 6), process="absorbing", mask_token_id=10, backend="torch")
    with pytest.raises(ValueError, match="token at batch 1, position 6 is still masked"):
        pipe(batch_size=2, seq_len=8, num_inference_steps=2, seed=0, progress=False, output_type="ids")


def test_dflash_names_the_nan_position(target):
    pipe = dflash_pipe(target)
    prompt = torch.tensor([[3, 1, 4, 1]])
    bad = 6  # absolute position whose logits (the target's output at position 5) hold NaN

    def poison(module, args, kwargs, output):
        positions = kwargs["position_ids"][0, -output.logits.shape[1]:]
        output.logits[0, positions == bad - 1] = float("nan")
        return output

    handle = target.register_forward_hook(poison, with_kwargs=True)
    try:
        with pytest.raises(ValueError, match=f"at batch 0, position {bad} of the sequence"):
            pipe(input_ids=prompt, max_new_tokens=6, progress=False, output_type="ids", stop_token_ids=[])
    finally:
        handle.remove()
