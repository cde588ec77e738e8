#!/usr/bin/env python
"""Train the tiny token diffusion checkpoints under tests/assets/ with ``python -m ddiff.train``.

    python scripts/train_tiny_token_model.py                 # all three (~15 min on one CPU core)
    python scripts/train_tiny_token_model.py --only udlm --max_train_steps 500

Each checkpoint is a 3-layer, 96-wide bidirectional (MDLM, UDLM) or block-causal (BD3LM,
block 4) Llama trained on the ``sorted_digits`` language (16 digits in non-decreasing order):
``model.safetensors`` (< 2 MB), ``config.json``, tokenizer files and ``scheduler_config.json``.
After training, the script samples 256 sequences with ``TokenDiffusionPipeline`` and writes
the validity rates to ``eval.json`` next to the weights (the tests check their own rates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "mdlm": ["mdlm"],
    "udlm": ["udlm"],
    "bd3lm": ["mdlm", "--block_size", "4"],
}
COMMON = ["--language", "sorted_digits", "--seq_len", "16", "--hidden_size", "96", "--num_layers", "3",
          "--num_heads", "4", "--batch_size", "128", "--learning_rate", "3e-3", "--log_every", "250",
          "--torch_threads", "1"]


def evaluate(path: str) -> dict:
    import torch

    from ddiff.pipelines import TokenDiffusionPipeline
    from ddiff.training import is_valid

    torch.set_num_threads(1)
    pipe = TokenDiffusionPipeline.from_pretrained(path, backend="torch")
    rates = {}
    settings = {"steps64": dict(num_inference_steps=64), "steps16": dict(num_inference_steps=16)}
    if pipe.process == "absorbing":
        settings["first_hitting"] = dict(num_inference_steps=16, first_hitting=True)
        settings["blocks4_steps64"] = dict(num_inference_steps=64, block_size=4)
    for name, kwargs in settings.items():
        out = pipe(batch_size=256, seq_len=16, seed=0, output_type="ids", progress=False, **kwargs)
        rates[name] = {"valid": round(float(is_valid("sorted_digits", out.sequences).float().mean()), 4),
                       "nfe": out.nfe}
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--out", default=os.path.join("tests", "assets"), help="relative to the repository root")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    for name in args.only:
        out = os.path.join(args.out, f"tiny_token_{name}")
        cmd = [sys.executable, "-m", "ddiff.train", *MODELS[name], "--output_dir", out, "--overwrite_output_dir",
               *COMMON,
               "--max_train_steps", str(args.max_train_steps)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(out, extra)):
                os.remove(os.path.join(out, extra))
        rates = evaluate(out)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(rates, f, indent=2, sort_keys=True)
            f.write("\n")
        size = os.path.getsize(os.path.join(out, "model.safetensors"))
        print(f"{out}: model.safetensors {size / 2**20:.2f} MiB, validity {rates}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
