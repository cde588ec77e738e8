#!/usr/bin/env python
"""Build the tiny DFlash test assets under tests/assets/ with ``python -m ddiff.train dflash``.

    python scripts/train_tiny_dflash.py                       # ~5 min on one CPU core
    python scripts/train_tiny_dflash.py --max_train_steps 300 --out /tmp/tiny

1. ``tiny_dflash_target/``: a random 4-layer Qwen3 (hidden 64, vocabulary 128, float32) from a
   transformers ``Qwen3Config`` and ``torch.manual_seed(0)``; it is committed so the tests see
   exactly the target the draft was trained on.
2. ``tiny_dflash_draft/``: a new 2-layer draft (block size 8, features of target layers 0 and 2)
   trained by the entry point on the target's own greedy continuations
   (``--regenerate_max_new_tokens``) of the fixed prompts in ``tiny_dflash_draft/prompts.jsonl``.
3. ``tiny_dflash_draft/eval.json``: mean acceptance length and losslessness of the trained draft
   and of an untrained draft of the same shape on those prompts (the tests check their own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, MASK_ID = 128, 127
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 24, 8, 64
TARGET = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)


def build_target(out: str) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TARGET)).eval()
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))


def write_prompts(path: str) -> None:
    import torch

    g = torch.Generator().manual_seed(1234)
    with open(path, "w") as f:
        for _ in range(NUM_PROMPTS):
            ids = torch.randint(0, MASK_ID, (PROMPT_LEN,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids}) + "\n")


def evaluate(target_dir: str, draft_dir: str, prompts: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ddiff.pipelines import DFlashDraftModel, DFlashPipeline

    torch.set_num_threads(1)
    target = AutoModelForCausalLM.from_pretrained(target_dir, local_files_only=True).eval()
    trained = DFlashDraftModel.from_pretrained(draft_dir)
    torch.manual_seed(0)
    untrained = DFlashDraftModel(trained.config).eval()
    with open(prompts) as f:
        ids = [json.loads(line)["input_ids"] for line in f if line.strip()]
    result = {}
    for name, draft in (("trained", trained), ("untrained", untrained)):
        pipe = DFlashPipeline(draft, target, backend="torch")
        lengths, lossless = [], True
        for p in ids:
            prompt = torch.tensor([p])
            out = pipe(input_ids=prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=[], progress=False,
                       output_type="ids")
            ref = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
            lossless &= bool(torch.equal(out.sequences, ref))
            lengths.extend(out.acceptance_lengths)
        result[name] = {"mean_acceptance_length": round(sum(lengths) / len(lengths), 4), "lossless": lossless}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_train_steps", type=int, default=1500)
    parser.add_argument("--out", default=os.path.join("tests", "assets"), help="relative to the repository root")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    target_dir = os.path.join(args.out, "tiny_dflash_target")
    draft_dir = os.path.join(args.out, "tiny_dflash_draft")
    os.makedirs(draft_dir, exist_ok=True)
    build_target(target_dir)
    prompts = os.path.join(draft_dir, "prompts.jsonl")
    write_prompts(prompts)
    cmd = [sys.executable, "-m", "ddiff.train", "dflash", "--target", target_dir, "--new-draft-layers", "2",
           "--block_size", "8", "--mask_token_id", str(MASK_ID), "--target_layer_ids", "0,2",
           "--data", prompts, "--regenerate_max_new_tokens", str(NEW_TOKENS), "--num_anchors", "32",
           "--attention_backend", "torch", "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "50",
           "--max_train_steps", str(args.max_train_steps), "--log_every", "100", "--torch_threads", "1",
           "--output_dir", draft_dir, "--overwrite_output_dir"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    result = evaluate(target_dir, draft_dir, prompts)
    with open(os.path.join(draft_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    sizes = {d: sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)) for d in (target_dir, draft_dir)}
    print(f"{result}; sizes (bytes): {sizes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
