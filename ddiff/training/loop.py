"""The accelerate training loop behind ``python -m ddiff.train``, shared by every objective.

An objective is a :class:`Recipe`: its command-line arguments and a ``setup`` that builds the
model, the batches, the loss and the checkpoint writer. The loop owns everything else, the same
for every recipe: the ``Accelerator`` (mixed precision, gradient accumulation, one or several
processes), AdamW with warmup + cosine decay, gradient clipping, logging, the held-out loss
(``--eval_steps``), periodic checkpoints (``checkpoint-<step>/``) and the final one in
``--output_dir``, each with ``training_args.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["Recipe", "TrainingSetup", "add_common_arguments", "run"]


@dataclass
class TrainingSetup:
    """What a recipe hands the loop.

    Attributes:
        model: the module that trains (prepared by accelerate; its unwrapped form reaches ``save``).
        next_batch: draws one micro-batch for this process (any object; ``loss`` receives it).
        loss: ``loss(model, batch) -> Tensor`` or ``(Tensor, dict of floats)`` (metrics to log).
        save: ``save(unwrapped_model, directory)`` writes a checkpoint (main process only).
        parameters: what the optimizer updates (default: the model's parameters that require grad).
        extra_modules: frozen modules to move to the device (e.g. a target model), not optimised.
        eval_batches: held-out batches of this process (None: no evaluation). The loop reports
            ``eval_loss`` (and ``eval_<metric>``) on them every ``--eval_steps`` steps and at the end,
            the model in eval mode, with the global RNG seeded the same way each time (so the noise is
            the same at every evaluation) and restored afterwards.
        eval_loss: ``loss`` for the held-out batches (default ``loss``); it should draw its noise from
            the global RNG (``generator=None``), which the loop seeds.
    """

    model: torch.nn.Module
    next_batch: Callable[[], Any]
    loss: Callable[[torch.nn.Module, Any], Any]
    save: Callable[[torch.nn.Module, str], None]
    parameters: Optional[Iterable[torch.nn.Parameter]] = None
    extra_modules: list = field(default_factory=list)
    eval_batches: Optional[list] = None
    eval_loss: Optional[Callable[[torch.nn.Module, Any], Any]] = None


@dataclass
class Recipe:
    """One objective of ``python -m ddiff.train``.

    ``add_arguments(parser)`` adds the recipe's own options (the common ones are added for it);
    ``setup(args, accelerator)`` returns a :class:`TrainingSetup`. ``defaults`` overrides common
    defaults (e.g. a smaller learning rate for fine-tuning).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    setup: Callable[[argparse.Namespace, Any], TrainingSetup]
    defaults: dict = field(default_factory=dict)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="where checkpoints and the final model go")
    parser.add_argument("--batch_size", type=int, default=64, help="per process and per micro-step")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--max_train_steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--checkpointing_steps", type=int, default=0, help="save every N steps (0: only at the end)")
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--eval_steps", type=int, default=0,
                        help="held-out loss every N steps (0: only at the end); with --data only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads on CPU (0: default)")


def _lr_lambda(args):
    def factor(step):
        if step < args.warmup_steps:
            return (step + 1) / max(1, args.warmup_steps)
        progress = (step - args.warmup_steps) / max(1, args.max_train_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save(accelerator, setup: TrainingSetup, model, args, directory: str) -> None:
    """Write a checkpoint atomically (:func:`ddiff.pipelines.loading.atomic_directory`): the recipe's
    files and ``training_args.json`` go to a temporary directory and move into ``directory``
    with the config files last, so an interrupted save never leaves a checkpoint that looks
    valid (for the final model in ``--output_dir``, never new weights beside stale configs)."""
    if not accelerator.is_main_process:
        return
    from ddiff.pipelines.loading import atomic_directory

    with atomic_directory(directory) as tmp:
        setup.save(accelerator.unwrap_model(model), tmp)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True, default=str)
            f.write("\n")


def _evaluate(accelerator, setup: TrainingSetup, model, args) -> dict:
    """Mean loss (and metrics) over every process's held-out batches, weighted by batch size."""
    loss_fn = setup.eval_loss or setup.loss
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    totals: dict[str, float] = {}
    count = 0
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(args.seed * 1000 + 999 + accelerator.process_index)
            for batch in setup.eval_batches:
                size = (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]
                with accelerator.autocast():
                    loss, metrics = _split_loss(loss_fn(model, batch))
                for name, value in {"loss": float(loss), **metrics}.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * size
                count += size
    finally:
        model.train()
    names = ["loss"] + sorted(name for name in totals if name != "loss")
    summed = accelerator.reduce(torch.tensor([totals.get(n, 0.0) for n in names] + [float(count)],
                                             device=accelerator.device, dtype=torch.float64), reduction="sum")
    return {f"eval_{n}": float(v) / max(1.0, float(summed[-1])) for n, v in zip(names, summed[:-1])}


def _log_eval(accelerator, setup, model, args, step) -> None:
    if setup.eval_batches is None:
        return
    means = _evaluate(accelerator, setup, model, args)
    accelerator.print(f"eval step {step}/{args.max_train_steps}  "
                      + "  ".join(f"{name} {value:.4f}" for name, value in means.items()))


def _split_loss(result):
    if isinstance(result, tuple):
        loss, metrics = result
        return loss, dict(metrics or {})
    return result, {}


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    """Train ``recipe`` with the parsed ``args``; returns 0."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)  # identical initial weights on every process
    setup = recipe.setup(args, accelerator)
    params = [p for p in (setup.parameters if setup.parameters is not None else setup.model.parameters())
              if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    # The LR schedule counts optimizer steps whatever the number of processes, so it is stepped by
    # hand after each real optimizer step rather than handed to accelerate (which steps a prepared
    # scheduler once per process).
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args))
    model, optimizer = accelerator.prepare(setup.model, optimizer)
    for module in setup.extra_modules:
        module.to(accelerator.device)
    model.train()

    accelerator.print(f"ddiff.train {recipe.name}: {sum(p.numel() for p in params)} trainable parameters, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {args.mixed_precision}")
    step, count, started = 0, 0, time.time()
    running: dict[str, float] = {}
    while step < args.max_train_steps:
        batch = setup.next_batch()
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, metrics = _split_loss(setup.loss(model, batch))
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                lr_scheduler.step()
            optimizer.zero_grad()
        for name, value in {"loss": float(loss.detach()), **metrics}.items():
            running[name] = running.get(name, 0.0) + float(value)
        count += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        if args.log_every and step % args.log_every == 0:
            means = {name: float(accelerator.reduce(torch.tensor(total / count, device=accelerator.device),
                                                    reduction="mean")) for name, total in running.items()}
            shown = "  ".join(f"{name} {value:.4f}" for name, value in means.items())
            accelerator.print(f"step {step}/{args.max_train_steps}  {shown}  lr {lr_scheduler.get_last_lr()[0]:.2e}  "
                              f"{time.time() - started:.1f}s")
            running, count = {}, 0
        if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
            _log_eval(accelerator, setup, model, args, step)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            accelerator.wait_for_everyone()
            _save(accelerator, setup, model, args, os.path.join(args.output_dir, f"checkpoint-{step}"))
    _log_eval(accelerator, setup, model, args, step)
    accelerator.wait_for_everyone()
    _save(accelerator, setup, model, args, args.output_dir)
    accelerator.print(f"saved to {args.output_dir} after {step} steps ({time.time() - started:.1f}s)")
    accelerator.end_training()
    return 0
