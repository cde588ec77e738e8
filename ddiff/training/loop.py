"""The accelerate training loop behind ``python -m ddiff.train``, shared by every objective.

An objective is a :class:`Recipe`: its command-line arguments and a ``setup`` that builds the
model, the batches, the loss and the checkpoint writer. The loop owns everything else, the same
for every recipe: the ``Accelerator`` (mixed precision, gradient accumulation, one or several
processes), AdamW with warmup + cosine decay, gradient clipping, logging, the held-out loss
(``--eval_steps``), periodic checkpoints (``checkpoint-<step>/``) and the final one in
``--output_dir``, each with ``training_args.json``.

**Output directory.** A non-empty ``--output_dir`` is refused (``ValueError`` naming it) unless
``--overwrite_output_dir`` is given (its ``checkpoint-N/`` and final model are then replaced,
each atomically, as they are written; other files, e.g. the higher ``checkpoint-N/`` of an
earlier longer run, stay) or the run resumes (``--resume_from_checkpoint``), so a rerun never
overwrites an earlier run silently.

**Checkpoints and resuming.** Every save is atomic
(:func:`ddiff.pipelines.loading.atomic_directory`: written to a temporary directory and moved in,
the config files and ``training_args.json`` last; an interrupted save, Ctrl-C included, leaves no
directory that loads). A periodic ``checkpoint-<step>/`` also holds ``training_state.pt``
(:data:`TRAINING_STATE`, read with ``torch.load(weights_only=True)``): the step, the trained
model's exact state dict, the optimizer, the LR schedule, the gradient scaler and, for every
process, the global RNGs (torch, CUDA, Python, NumPy), the recipe's ``TrainingSetup.generators``
and the state of ``next_batch`` when it has ``state_dict`` / ``load_state_dict``.
``--resume_from_checkpoint PATH`` (a ``checkpoint-<step>/`` directory) or ``latest`` (the
highest complete ``checkpoint-<step>/`` of ``--output_dir``; complete = it holds
``training_args.json`` and ``training_state.pt``) restores all of it and continues from that
step, so an interrupted run resumed with the same arguments ends with the same weights as an
uninterrupted one. A resume needs the same number of processes (the per-process RNGs) and a
model of the same shape (``ValueError`` otherwise); a checkpoint without training state is
refused, naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["Recipe", "TRAINING_STATE", "TrainingSetup", "add_common_arguments", "find_latest_checkpoint", "run"]

#: The file of a ``checkpoint-<step>/`` that holds what a resume restores (module docstring).
TRAINING_STATE = "training_state.pt"


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
        generators: the recipe's own ``torch.Generator`` s (noise, anchors, data), by name: their
            states go into every checkpoint and are restored on ``--resume_from_checkpoint``.
            ``next_batch``'s state is saved too when it has ``state_dict()`` /
            ``load_state_dict()``. Any other hidden state of a recipe is not, and its resumed run
            would differ from an uninterrupted one.
    """

    model: torch.nn.Module
    next_batch: Callable[[], Any]
    loss: Callable[[torch.nn.Module, Any], Any]
    save: Callable[[torch.nn.Module, str], None]
    parameters: Optional[Iterable[torch.nn.Parameter]] = None
    extra_modules: list = field(default_factory=list)
    eval_batches: Optional[list] = None
    eval_loss: Optional[Callable[[torch.nn.Module, Any], Any]] = None
    generators: dict = field(default_factory=dict)


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
    parser.add_argument("--output_dir", required=True,
                        help="where checkpoints and the final model go; must be empty or absent unless "
                             "--overwrite_output_dir or --resume_from_checkpoint")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="write into a non-empty --output_dir (its checkpoints and final model are replaced)")
    parser.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|latest",
                        help="continue from a checkpoint-<step>/ directory (optimizer, LR schedule, RNGs, data "
                             "order and step restored), or 'latest': the highest one in --output_dir")
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


def _save(accelerator, setup: TrainingSetup, model, args, directory: str, state: Optional[dict] = None) -> None:
    """Write a checkpoint atomically (:func:`ddiff.pipelines.loading.atomic_directory`): the recipe's
    files, ``training_args.json`` and (``state``, periodic checkpoints) :data:`TRAINING_STATE` go
    to a temporary directory and move into ``directory`` with the config files last, so an
    interrupted save never leaves a checkpoint that looks valid (for the final model in
    ``--output_dir``, never new weights beside stale configs)."""
    if not accelerator.is_main_process:
        return
    from ddiff.pipelines.loading import atomic_directory

    with atomic_directory(directory) as tmp:
        setup.save(accelerator.unwrap_model(model), tmp)
        if state is not None:
            torch.save(state, os.path.join(tmp, TRAINING_STATE))
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True, default=str)
            f.write("\n")


def _check_output_dir(args) -> None:
    """Refuse a non-empty ``--output_dir`` unless ``--overwrite_output_dir`` or a resume."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out!r} is a file; it must be a directory (absent or empty).")
    if getattr(args, "overwrite_output_dir", False) or getattr(args, "resume_from_checkpoint", None):
        return
    if os.path.isdir(out) and os.listdir(out):
        held = sorted(os.listdir(out))
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(f"--output_dir {out!r} is not empty (it holds {shown}): pass --overwrite_output_dir to "
                         f"replace its checkpoints and final model, --resume_from_checkpoint to continue the run "
                         f"saved there, or choose another directory.")


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    """The highest-step complete ``checkpoint-<step>/`` of ``output_dir`` (it holds
    ``training_args.json`` and :data:`TRAINING_STATE`), or None."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and all(os.path.isfile(os.path.join(path, f)) for f in ("training_args.json", TRAINING_STATE)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _resume_path(args) -> Optional[str]:
    """The checkpoint ``--resume_from_checkpoint`` names, checked to hold a complete training state."""
    value = getattr(args, "resume_from_checkpoint", None)
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"--resume_from_checkpoint must be a checkpoint directory or 'latest', got {value!r}.")
    value = os.fspath(value)
    if value == "latest":
        path = find_latest_checkpoint(args.output_dir)
        if path is None:
            raise ValueError(f"--resume_from_checkpoint latest: --output_dir {args.output_dir!r} holds no complete "
                             f"checkpoint-<step>/ (with training_args.json and {TRAINING_STATE}).")
        return path
    from ddiff.pipelines.loading import resolve_checkpoint_dir

    path = resolve_checkpoint_dir(value, "--resume_from_checkpoint")
    missing = [f for f in (TRAINING_STATE, "training_args.json") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ValueError(f"--resume_from_checkpoint {value!r} holds no complete training state (missing "
                         f"{', '.join(missing)}): pass a checkpoint-<step>/ directory written with "
                         f"--checkpointing_steps (the final model in --output_dir has no training state).")
    return path


def _process_state(setup: TrainingSetup) -> dict:
    """This process's RNGs and data position (the part of the training state that differs per process)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "generators": {name: g.get_state() for name, g in setup.generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover
        pass
    if callable(getattr(setup.next_batch, "state_dict", None)):
        state["data"] = setup.next_batch.state_dict()
    return state


def _training_state(accelerator, setup, model, optimizer, lr_scheduler, step: int) -> dict:
    """What :data:`TRAINING_STATE` holds (gathered from every process; written by the main one)."""
    local = _process_state(setup)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        processes = gather_object([local])
    else:
        processes = [local]
    scaler = getattr(accelerator, "scaler", None)
    return {"format": 1, "step": step, "num_processes": accelerator.num_processes,
            "model": {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(), "processes": processes}


def _load_training_state(path: str, accelerator, setup, model, optimizer, lr_scheduler) -> tuple[int, dict]:
    """Restore the model, optimizer, schedule and scaler from ``path``; returns the step and this
    process's RNG / data state (restored by :func:`_restore_process_state` right before training)."""
    file = os.path.join(path, TRAINING_STATE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file} could not be read as a training state (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or state.get("format") != 1 or not isinstance(state.get("step"), int):
        raise ValueError(f"{file} is not a ddiff training state (format 1).")
    try:
        saved_processes, processes = state["num_processes"], state["processes"]
        model_state, optimizer_state, schedule_state = state["model"], state["optimizer"], state["lr_scheduler"]
        local = processes[accelerator.process_index]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{file} is not a complete ddiff training state ({type(e).__name__}: {e}).") from e
    if saved_processes != accelerator.num_processes:
        raise ValueError(f"{file} was saved by {saved_processes} process(es) but this run has "
                         f"{accelerator.num_processes}: resume with the same number of processes.")
    try:
        accelerator.unwrap_model(model).load_state_dict(model_state)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{file}: the checkpoint's model does not match this run's model (were the model "
                         f"options changed?): {e}") from e
    try:
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(schedule_state)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{file}: the optimizer / LR-schedule state does not fit this run: {e}") from e
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state["step"], local


def _restore_process_state(setup: TrainingSetup, local: dict, file: str) -> None:
    missing = sorted(set(setup.generators) - set(local["generators"]))
    if missing:
        raise ValueError(f"{file} has no state for the recipe's generator(s) {missing}: it was saved by another "
                         f"recipe or version.")
    for name, g in setup.generators.items():
        g.set_state(local["generators"][name])
    if callable(getattr(setup.next_batch, "load_state_dict", None)):
        if "data" not in local:
            raise ValueError(f"{file} has no data-loader state for this recipe.")
        setup.next_batch.load_state_dict(local["data"])
    torch.set_rng_state(local["torch"])
    if "cuda" in local and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(local["cuda"])
    random.setstate((local["python"][0], tuple(local["python"][1]), local["python"][2]))
    if "numpy" in local:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = local["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


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

    _check_output_dir(args)
    resume = _resume_path(args)
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
    step, local_state = 0, None
    if resume is not None:
        step, local_state = _load_training_state(resume, accelerator, setup, model, optimizer, lr_scheduler)

    accelerator.print(f"ddiff.train {recipe.name}: {sum(p.numel() for p in params)} trainable parameters, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {args.mixed_precision}")
    if local_state is not None:
        _restore_process_state(setup, local_state, os.path.join(resume, TRAINING_STATE))
        accelerator.print(f"resumed from {resume} at step {step}")
    count, started = 0, time.time()
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
            state = _training_state(accelerator, setup, model, optimizer, lr_scheduler, step)
            _save(accelerator, setup, model, args, os.path.join(args.output_dir, f"checkpoint-{step}"), state)
    _log_eval(accelerator, setup, model, args, step)
    accelerator.wait_for_everyone()
    _save(accelerator, setup, model, args, args.output_dir)
    accelerator.print(f"saved to {args.output_dir} after {step} steps ({time.time() - started:.1f}s)")
    accelerator.end_training()
    return 0
