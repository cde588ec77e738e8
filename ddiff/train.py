"""Train a model: ``python -m ddiff.train <objective> --output_dir DIR [...]``.

Built on accelerate, so the same command runs on one CPU, one GPU, or several GPUs::

    python -m ddiff.train mdlm --output_dir out/mdlm --max_train_steps 2000
    accelerate launch --num_processes 8 -m ddiff.train udlm --output_dir out/udlm --mixed_precision bf16
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m ddiff.train mdlm ...   # several CPU processes (gloo)

Each objective is a :class:`ddiff.training.loop.Recipe` (``python -m ddiff.train <objective> -h``
lists its options); the loop, optimizer, mixed precision, gradient accumulation and checkpoints
are shared (:mod:`ddiff.training.loop`).
"""

from __future__ import annotations

import argparse
import sys

from ddiff.training.bd3lm import BD3LM
from ddiff.training.block_refinement import BLOCK_REFINEMENT
from ddiff.training.dflash import DFLASH
from ddiff.training.hybrid import HYBRID
from ddiff.training.loop import add_common_arguments, run
from ddiff.training.token_diffusion_recipes import MDLM, UDLM

RECIPES = {recipe.name: recipe for recipe in (MDLM, UDLM, HYBRID, BD3LM, BLOCK_REFINEMENT, DFLASH)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddiff.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="objective", required=True, metavar="{" + ",".join(RECIPES) + "}")
    for recipe in RECIPES.values():
        p = sub.add_parser(recipe.name, help=recipe.help, description=recipe.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_common_arguments(p)
        recipe.add_arguments(p)
        if recipe.defaults:
            p.set_defaults(**recipe.defaults)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(RECIPES[args.objective], args)


if __name__ == "__main__":
    sys.exit(main())
