"""DFlash draft training: anchors, blocks, the chunked LM-head loss, ``dflash_loss`` and the recipe.

The SpecForge regressions are tests here: labels are not shifted (block position k predicts
x[a + k]), block b's context is strictly before its anchor (an oracle running the inference
forward on ``features[:a]`` per block gives the same loss), padding never leaks in, and a row
with no valid anchor (or a batch with none) neither errors nor hangs. Exactness is asserted in
float64 with the torch attention backend.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ddiff.pipelines import DFlashDraftModel
from tiny_qwen3 import MASK, VOCAB, tiny_target
from ddiff.pipelines.dflash_model import target_features
from ddiff.training import dflash_loss
from ddiff.training.dflash import build_dflash_blocks, default_gamma, lm_head_cross_entropy, sample_anchors



pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def target():
    return tiny_target()


def tiny_draft(target, block_size=4, seed=1):
    torch.manual_seed(seed)
    return DFlashDraftModel.from_target_config(target.config, 1, block_size=block_size, mask_token_id=MASK,
                                               target_layer_ids=[0, 1], initializer_range=0.1).to(target.dtype)


# ---------------------------------------------------------------------------------------------
# anchors and blocks
# ---------------------------------------------------------------------------------------------


def test_sample_anchors_are_valid_sorted_and_distinct():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        mask = torch.rand(3, 30, generator=g) < 0.7
        mask[2] = False  # a row with no valid anchor
        anchors, keep = sample_anchors(mask, 6, generator=g)
        valid = mask[:, :-1] & mask[:, 1:]
        counts = valid.sum(1)
        assert anchors.shape == keep.shape and anchors.dtype == torch.int64
        assert anchors.shape[1] == max(1, min(6, int(counts.max())))
        for b in range(3):
            kept = anchors[b][keep[b]].tolist()
            assert len(kept) == min(anchors.shape[1], int(counts[b]))
            assert kept == sorted(set(kept))  # sorted, without replacement
            assert all(bool(valid[b, a]) for a in kept)  # token and next token supervised
            assert keep[b].tolist() == sorted(keep[b].tolist(), reverse=True)  # dropped blocks last
            assert anchors[b][~keep[b]].eq(0).all()
        assert not keep[2].any()


def test_sample_anchors_are_uniform():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(400, 20, dtype=torch.bool)
    mask[:, 10] = False  # positions 9 and 10 are not valid anchors
    anchors, keep = sample_anchors(mask, 5, generator=g)
    assert keep.all()
    counts = torch.bincount(anchors.reshape(-1), minlength=19).double()
    assert counts[9] == 0 and counts[10] == 0
    expected = 400 * 5 / 17
    others = torch.cat([counts[:9], counts[11:19]])
    chi2 = float(((others - expected) ** 2 / expected).sum())
    assert chi2 < 45.0  # 16 degrees of freedom: p ~ 1e-4


def test_sample_anchors_edge_cases():
    anchors, keep = sample_anchors(torch.ones(2, 1, dtype=torch.bool), 4)
    assert anchors.shape == (2, 1) and not keep.any()
    anchors, keep = sample_anchors(torch.ones(1, 3, dtype=torch.bool), 512)
    assert anchors.tolist() == [[0, 1]] and keep.all()
    with pytest.raises(ValueError, match="num_anchors"):
        sample_anchors(torch.ones(1, 3, dtype=torch.bool), 0)


def test_blocks_labels_are_not_shifted_and_weights_decay():
    x = torch.arange(10, 22)[None]  # token at position p is 10 + p
    anchors = torch.tensor([[0, 3, 9, 0]])
    keep = torch.tensor([[True, True, True, False]])
    loss_mask = torch.ones(1, 12, dtype=torch.bool)
    loss_mask[0, 5] = False
    blocks = build_dflash_blocks(x, anchors, keep, block_size=4, mask_token_id=MASK, loss_mask=loss_mask, gamma=2.0)
    assert blocks.noise_ids.tolist() == [[10, MASK, MASK, MASK, 13, MASK, MASK, MASK, 19, MASK, MASK, MASK,
                                          MASK, MASK, MASK, MASK]]
    assert blocks.position_ids.tolist() == [list(range(12)) + [0, 1, 2, 3, 3, 4, 5, 6, 9, 10, 11, 12, 0, 1, 2, 3]]
    assert blocks.labels[0, 1].tolist() == [13, 14, 15, 16]  # x[a + k]: same-position prediction
    assert blocks.labels[0, 0].tolist() == [10, 11, 12, 13]
    w = [1.0, math.exp(-0.5), math.exp(-1.0)]
    torch.testing.assert_close(blocks.weights[0, 0], torch.tensor([0.0, *w], dtype=torch.float64))
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(blocks.weights[0, 1], torch.tensor([0.0, w[0], 0.0, w[2]], **f64))  # x[5] unsupervised
    torch.testing.assert_close(blocks.weights[0, 2], torch.tensor([0.0, w[0], w[1], 0.0], **f64))  # 12: past the end
    assert blocks.weights[0, 3].eq(0).all()  # dropped block


def test_default_gamma():
    assert (default_gamma(16), default_gamma(10), default_gamma(8), default_gamma(4)) == (7.0, 5.0, 4.0, 2.0)


# ---------------------------------------------------------------------------------------------
# chunked LM-head cross-entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_cross_entropy_matches_the_plain_loss(chunk, bias):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, 11, (7,), generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    ce, pred = lm_head_cross_entropy(hidden, weight, labels, bias=b, chunk_size=chunk)
    (ce * w).sum().backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    logits = F.linear(ref_h, weight.detach(), b)
    ref = F.cross_entropy(logits, labels, reduction="none")
    (ref * w).sum().backward()
    torch.testing.assert_close(ce, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(pred, logits.argmax(-1))
    assert weight.grad is None  # the target's head is frozen


# ---------------------------------------------------------------------------------------------
# dflash_loss
# ---------------------------------------------------------------------------------------------


def oracle_loss(draft, target, x, anchors, keep, loss_mask, gamma):
    """The DFlash loss block by block: the inference forward on ``features[:a]`` for each block."""
    bs = draft.block_size
    with torch.no_grad():
        feats = target_features(target(x, output_hidden_states=True, use_cache=False).hidden_states,
                                draft.target_layer_ids)
    emb, head = target.get_input_embeddings(), target.get_output_embeddings()
    num = den = 0.0
    S = x.shape[1]
    for b in range(x.shape[0]):
        for n in range(anchors.shape[1]):
            if not keep[b, n]:
                continue
            a = int(anchors[b, n])
            ids = torch.tensor([int(x[b, a])] + [MASK] * (bs - 1))
            h = draft(noise_embedding=emb(ids)[None], target_hidden=feats[b:b + 1, :a],
                      position_ids=torch.arange(a + bs)[None])
            logits = head(h)[0]
            for k in range(1, bs):
                if a + k < S and bool(loss_mask[b, a + k]):
                    w = math.exp(-(k - 1) / gamma)
                    num = num + w * F.cross_entropy(logits[k:k + 1], x[b, a + k:a + k + 1])
                    den += w
    return num / den


def test_dflash_loss_equals_the_per_block_oracle(target):
    draft = tiny_draft(target)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, MASK, (2, 18), generator=g)
    loss_mask = torch.ones(2, 18, dtype=torch.bool)
    loss_mask[0, :4] = False  # an unsupervised prompt
    loss_mask[1, 9] = False
    loss, metrics = dflash_loss(draft, target, x, loss_mask, num_anchors=5, gamma=3.0,
                                generator=torch.Generator().manual_seed(7), attention_backend="torch", chunk_size=5)
    anchors, keep = sample_anchors(loss_mask, 5, generator=torch.Generator().manual_seed(7))
    want = oracle_loss(draft, target, x, anchors, keep, loss_mask, 3.0)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, list(draft.parameters()))
    want_grads = torch.autograd.grad(want, list(draft.parameters()))
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-11)
    assert metrics["num_blocks"] == float(keep.sum())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["acceptance_length"] >= 1.0


def test_padding_does_not_leak(target):
    draft = tiny_draft(target)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, MASK, (2, 16), generator=g)
    attention = torch.ones(2, 16, dtype=torch.int64)
    attention[1, 10:] = 0
    results = []
    for pad in (0, 17, 63):
        xp = x.clone()
        xp[1, 10:] = pad
        draft.zero_grad()
        loss, _ = dflash_loss(draft, target, xp, num_anchors=6, generator=torch.Generator().manual_seed(5),
                              attention_mask=attention, attention_backend="torch")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in draft.parameters()]))
        # the loss mask alone (no attention mask) also keeps right padding out
        mask = attention.bool()
        loss_m, _ = dflash_loss(draft, target, xp, mask, num_anchors=6, generator=torch.Generator().manual_seed(5),
                                attention_backend="torch")
        torch.testing.assert_close(loss_m, loss.detach(), rtol=1e-10, atol=1e-12)
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rows_without_valid_anchors_do_not_error_or_hang(target):
    draft = tiny_draft(target)
    x = torch.randint(0, MASK, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1] = False
    loss, metrics = dflash_loss(draft, target, x, mask, num_anchors=4, attention_backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and metrics["num_blocks"] == 4.0
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters())
    draft.zero_grad()
    none = torch.zeros(2, 12, dtype=torch.bool)
    none[:, ::2] = True  # no two consecutive supervised tokens anywhere
    loss, metrics = dflash_loss(draft, target, x, none, num_anchors=4, attention_backend="torch")
    loss.backward()  # still reaches every parameter (no process skips the all-reduce)
    assert float(loss.detach()) == 0.0 and metrics["num_tokens"] == 0.0
    assert all(p.grad is not None and p.grad.eq(0).all() for p in draft.parameters())


def test_dflash_loss_flex_backend_matches_torch(target):
    draft = tiny_draft(target)
    x = torch.randint(0, MASK, (1, 14), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # FlexAttention has no backward on CPU
        losses = [dflash_loss(draft, target, x, num_anchors=3, generator=torch.Generator().manual_seed(1),
                              attention_backend=backend)[0] for backend in ("torch", "flex")]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=1e-9)


def test_dflash_loss_input_checks(target):
    draft = tiny_draft(target)
    x = torch.randint(0, MASK, (1, 8))
    with pytest.raises(ValueError, match="input_ids"):
        dflash_loss(draft, target, x[0])
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        dflash_loss(draft, target, x + VOCAB)
    with pytest.raises(ValueError, match="loss_mask"):
        dflash_loss(draft, target, x, torch.ones(1, 7, dtype=torch.bool))
    left = torch.ones(1, 8, dtype=torch.int64)
    left[0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        dflash_loss(draft, target, x, attention_mask=left)
    with pytest.raises(ValueError, match="gamma"):
        dflash_loss(draft, target, x, gamma=0.0)
    with pytest.raises(ValueError, match="num_target_layers"):
        dflash_loss(draft, tiny_target_with_layers(2), x)


def tiny_target_with_layers(layers):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return Qwen3ForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------
# python -m ddiff.train dflash
# ---------------------------------------------------------------------------------------------


def test_train_entry_point_new_draft_then_fine_tune(tmp_path):
    from ddiff.train import main

    target = tiny_target(torch.float32)
    target_dir = tmp_path / "target"
    target.save_pretrained(target_dir)
    data = tmp_path / "prompts.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for _ in range(3):
            f.write(json.dumps({"input_ids": torch.randint(0, MASK, (5,), generator=g).tolist()}) + "\n")
    common = ["--target", str(target_dir), "--data", str(data), "--regenerate_max_new_tokens", "8",
              "--num_anchors", "4", "--attention_backend", "torch", "--batch_size", "2", "--max_train_steps", "2",
              "--warmup_steps", "1", "--log_every", "1"]
    first = tmp_path / "draft"
    assert main(["dflash", "--new-draft-layers", "1", "--block_size", "4", "--mask_token_id", str(MASK),
                 "--output_dir", str(first), *common]) == 0
    with open(first / "config.json") as f:
        cfg = json.load(f)
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == 3 and cfg["num_hidden_layers"] == 1
    assert cfg["dflash_config"] == {"mask_token_id": MASK, "target_layer_ids": [1]}
    draft = DFlashDraftModel.from_pretrained(str(first))
    second = tmp_path / "tuned"
    assert main(["dflash", "--draft", str(first), "--output_dir", str(second), "--save_dtype", "bfloat16",
                 "--chunk_size", "3", *common]) == 0
    tuned = DFlashDraftModel.from_pretrained(str(second))
    assert tuned.dtype == torch.bfloat16 and set(tuned.state_dict()) == set(draft.state_dict())
    assert any(not torch.equal(tuned.state_dict()[k].float(), v.float()) for k, v in draft.state_dict().items())
    assert os.path.exists(second / "training_args.json")


def test_train_entry_point_needs_a_draft_choice(tmp_path, capsys):
    from ddiff.train import main

    with pytest.raises(SystemExit):
        main(["dflash", "--target", str(tmp_path), "--data", "x", "--output_dir", str(tmp_path / "o")])
    assert "--draft" in capsys.readouterr().err
