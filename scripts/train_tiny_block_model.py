#!/usr/bin/env python
"""Train the tiny masked-diffusion LM the BlockDiffusionPipeline tests decode with.

Task (synthetic, copy): the prompt is ``BOS x_1 .. x_n SEP`` with n in [3, 10] distinct symbols,
and the answer is ``x_1 .. x_n EOS EOS ..`` (trailing EOS up to the generation length, as in
LLaDA's SFT data). A pipeline that decodes correctly reproduces the prompt; one that decodes
garbage does not.

Model: a 2-layer Qwen3 (hidden 64, random init), made bidirectional, block-causal or causal by
4-D additive attention masks. One set of weights is trained for all three attention kinds the
pipeline supports, each with its masked-diffusion objective (loss on masked positions only):

* bidirectional (LLaDA / Dream): either uniform masking of the answer with a random ratio
  t ~ U(0, 1), or the semi-autoregressive state LLaDA's sampler visits (answer blocks before
  block k clean, block k masked with ratio t, later blocks fully masked);
* block-causal (SDAR / BD3LM): blocks aligned to absolute columns, a random block k of the
  answer masked with ratio t, earlier blocks clean, attention block-causal; loss on block k;
* causal (block refinement of a causal LM): as block-causal with a causal mask.

Block lengths (2..8) and left padding (0..3 tokens) vary per sample, so the model serves any
block length and batched prompts of different lengths. Training takes a few minutes on two CPU
cores; the weights (fp32, ~0.4 MB) go to ``tests/assets/tiny_block_copy.safetensors`` with
``tiny_block_copy.json`` (model config, token ids, task, per-mode accuracy of the pipeline).

    python scripts/train_tiny_block_model.py            # ~3-4 minutes
    python scripts/train_tiny_block_model.py --steps 200 --out /tmp/tiny   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, BOS, SEP, EOS, MASK = 0, 1, 2, 3, 4
FIRST_SYMBOL, NUM_SYMBOLS = 5, 16
VOCAB = 24
MIN_N, MAX_N = 3, 10
MAX_EXTRA = 10  # generation window: n + 1 .. n + 1 + MAX_EXTRA
MAX_PAD = 3
MODES = ("bidirectional", "block_causal", "causal")

MODEL_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)


def build_model(config: dict | None = None):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**(config or MODEL_CONFIG))
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg)


def make_example(rng: random.Random, n: int | None = None, extra: int | None = None):
    """(prompt ids, answer ids) of one copy example."""
    if n is None:
        n = rng.randint(MIN_N, MAX_N)
    if extra is None:
        extra = rng.randint(0, MAX_EXTRA)
    symbols = [FIRST_SYMBOL + i for i in rng.sample(range(NUM_SYMBOLS), n)]
    prompt = [BOS] + symbols + [SEP]
    answer = symbols + [EOS] * (1 + extra)
    return prompt, answer


def _mask_some(rng: random.Random, count: int, ratio: float) -> list[bool]:
    """Each of ``count`` positions masked with probability ``ratio``; at least one."""
    m = [rng.random() < ratio for _ in range(count)]
    if not any(m):
        m[rng.randrange(count)] = True
    return m


def make_batch(rng: random.Random, batch: int):
    """Noisy inputs, targets (-100 = no loss), 4-D additive masks and position ids."""
    rows = []
    for _ in range(batch):
        prompt, answer = make_example(rng)
        pad = rng.randint(0, MAX_PAD)
        mode = rng.choices(MODES, weights=(0.4, 0.3, 0.3))[0]
        bl = rng.randint(2, 8)
        clean = [PAD] * pad + prompt + answer
        a0 = pad + len(prompt)  # first answer column
        total = len(clean)
        t = max(rng.random(), 0.05)
        noisy = [False] * total
        loss = [False] * total
        if mode == "bidirectional":
            if rng.random() < 0.5:  # uniform masking of the whole answer
                noisy[a0:] = _mask_some(rng, total - a0, t)
            else:  # LLaDA's semi-autoregressive state, blocks from the end of the prompt
                k = rng.randrange(-(-(total - a0) // bl))
                lo, hi = a0 + k * bl, min(a0 + (k + 1) * bl, total)
                noisy[lo:hi] = _mask_some(rng, hi - lo, t)
                noisy[hi:] = [True] * (total - hi)
            loss = list(noisy)
        else:  # block-causal / causal: blocks aligned to absolute columns, loss on one block
            k = rng.randint(a0 // bl, (total - 1) // bl)
            lo, hi = max(k * bl, a0), min((k + 1) * bl, total)
            noisy[lo:hi] = loss[lo:hi] = _mask_some(rng, hi - lo, t)
            noisy[hi:] = [True] * (total - hi)
        rows.append((clean, noisy, loss, pad, mode, bl))

    T = max(len(r[0]) for r in rows)
    ids = torch.full((batch, T), PAD, dtype=torch.int64)
    noisy_t = torch.zeros(batch, T, dtype=torch.bool)
    loss_t = torch.zeros(batch, T, dtype=torch.bool)
    lengths, pads, kinds, bls = [], [], [], []
    for b, (clean, noisy, loss, pad, mode, bl) in enumerate(rows):
        L = len(clean)
        ids[b, :L] = torch.tensor(clean)
        noisy_t[b, :L] = torch.tensor(noisy)
        loss_t[b, :L] = torch.tensor(loss)
        lengths.append(L)
        pads.append(pad)
        kinds.append(MODES.index(mode))
        bls.append(bl)
    targets = torch.where(loss_t, ids, -100)
    ids = torch.where(noisy_t, MASK, ids)
    cols = torch.arange(T)
    lengths, pads = torch.tensor(lengths)[:, None], torch.tensor(pads)[:, None]
    kinds, bls = torch.tensor(kinds)[:, None, None], torch.tensor(bls)[:, None, None]
    valid = (cols[None] >= pads) & (cols[None] < lengths)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    q, k = cols[None, :, None], cols[None, None, :]
    blk_q, blk_k = q // bls, k // bls
    pattern = torch.where(kinds == 0, True, torch.where(kinds == 1, blk_k <= blk_q, k <= q))
    allowed = (pattern & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]
    attn = torch.zeros(batch, 1, T, T).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return ids, targets, attn, positions


def evaluate(model, num: int = 64, seed: int = 1234) -> dict:
    """Token accuracy of BlockDiffusionPipeline (greedy) on fresh copy prompts, per attention kind."""
    sys.path.insert(0, REPO)
    from ddiff.pipelines import BlockDiffusionPipeline

    rng = random.Random(seed)
    examples = [make_example(rng) for _ in range(num)]
    results = {}
    settings = {
        "bidirectional": dict(attention="bidirectional"),
        "block_causal": dict(attention="block_causal", use_kv_cache=True),
        "causal": dict(attention="causal", use_kv_cache=True),
    }
    for name, kwargs in settings.items():
        pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, eos_token_id=EOS, backend="torch", **kwargs)
        correct = total = 0
        for rule in (dict(steps_per_block=4), dict(threshold=0.9)):
            for prompt, answer in examples:
                out = pipe(input_ids=torch.tensor([prompt]), max_new_tokens=len(answer), block_length=4,
                           eos_early_stop=False, progress=False, **rule)
                got = out.sequences[0].tolist()
                correct += sum(int(a == b) for a, b in zip(got, answer))
                total += len(answer)
        results[name] = correct / total
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "assets", "tiny_block_copy"),
                        help="output stem: writes STEM.safetensors and STEM.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    model = build_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    started = time.time()
    running = None
    for step in range(args.steps):
        ids, targets, attn, positions = make_batch(rng, args.batch)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.time() - started:6.1f}s", flush=True)

    model.eval()
    accuracy = evaluate(model)
    print("pipeline accuracy per attention kind:", json.dumps(accuracy))

    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out + ".safetensors", metadata={"format": "pt"})
    meta = {
        "model_type": "qwen3",
        "model_config": MODEL_CONFIG,
        "tokens": {"pad": PAD, "bos": BOS, "sep": SEP, "eos": EOS, "mask": MASK,
                   "first_symbol": FIRST_SYMBOL, "num_symbols": NUM_SYMBOLS},
        "task": {"name": "copy", "prompt": "BOS x_1..x_n SEP (distinct symbols)", "answer": "x_1..x_n EOS EOS ..",
                 "min_n": MIN_N, "max_n": MAX_N, "max_extra": MAX_EXTRA, "max_left_pad": MAX_PAD},
        "trained_attention": list(MODES),
        "block_lengths": [2, 8],
        "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "seconds": round(time.time() - started, 1)},
        "pipeline_accuracy": accuracy,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}.safetensors ({os.path.getsize(args.out + '.safetensors') / 1e6:.2f} MB) and .json")


if __name__ == "__main__":
    main()
