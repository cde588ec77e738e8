"""Train a token diffusion denoiser: ``python -m ddiff.train {mdlm,udlm} --output_dir DIR [...]``.

Built on accelerate, so the same command runs on one CPU, one GPU, or several GPUs::

    python -m ddiff.train mdlm --output_dir out/mdlm --max_train_steps 2000
    accelerate launch --num_processes 8 -m ddiff.train udlm --output_dir out/udlm --mixed_precision bf16
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m ddiff.train mdlm ...   # several CPU processes (gloo)

* ``mdlm``: absorbing diffusion with :func:`ddiff.training.mdlm_loss`; ``--block_size`` trains a
  BD3LM (block-causal denoiser, ``x_t ⊕ x_0`` under :func:`ddiff.training.block_diffusion_mask`).
* ``udlm``: uniform diffusion with :func:`ddiff.training.udlm_loss` (the mask id is the last id
  and is never used as noise).

The denoiser is :func:`ddiff.denoiser.tiny_denoiser` (a small Llama made bidirectional or
block-causal) sized by ``--hidden_size`` / ``--num_layers`` / ``--num_heads``; the data is a
synthetic language (``--language``, see :data:`ddiff.training.LANGUAGES`), drawn fresh on every
process (seeded by ``--seed`` and the process index). Gradient accumulation and mixed precision
are accelerate's. Checkpoints (``checkpoint-<step>/`` every ``--checkpointing_steps``, and the
final one in ``--output_dir``) hold ``model.safetensors`` + ``config.json`` (transformers), the
tokenizer, ``scheduler_config.json`` (:class:`ddiff.pipelines.TokenDiffusionScheduler`) and
``training_args.json``, so ``TokenDiffusionPipeline.from_pretrained(dir)`` loads them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddiff.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="objective", required=True, metavar="{mdlm,udlm}")
    for name, desc in (("mdlm", "absorbing (masked) diffusion: MDLM, or BD3LM with --block_size"),
                       ("udlm", "uniform diffusion: UDLM")):
        p = sub.add_parser(name, help=desc, description=desc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--output_dir", required=True, help="where checkpoints and the final model go")
        p.add_argument("--language", default="sorted_digits", choices=["sorted_digits", "brackets"],
                       help="synthetic training language")
        p.add_argument("--seq_len", type=int, default=16)
        if name == "mdlm":
            p.add_argument("--block_size", type=int, default=None, help="BD3LM block size (block-causal model)")
        p.add_argument("--hidden_size", type=int, default=64)
        p.add_argument("--num_layers", type=int, default=2)
        p.add_argument("--num_heads", type=int, default=4)
        p.add_argument("--intermediate_size", type=int, default=None, help="default: 3 * hidden_size")
        p.add_argument("--alpha_schedule", default="log_linear", choices=["log_linear", "linear", "cosine", "geometric"])
        p.add_argument("--eps", type=float, default=1e-3)
        p.add_argument("--t_min", type=float, default=1e-3, help="smallest training time")
        p.add_argument("--batch_size", type=int, default=64, help="per process and per micro-step")
        p.add_argument("--gradient_accumulation_steps", type=int, default=1)
        p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
        p.add_argument("--learning_rate", type=float, default=3e-3)
        p.add_argument("--weight_decay", type=float, default=0.0)
        p.add_argument("--warmup_steps", type=int, default=100)
        p.add_argument("--max_grad_norm", type=float, default=1.0)
        p.add_argument("--max_train_steps", type=int, default=2000, help="optimizer steps")
        p.add_argument("--checkpointing_steps", type=int, default=0, help="save every N steps (0: only at the end)")
        p.add_argument("--log_every", type=int, default=100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads on CPU (0: default)")
    return parser


def _save(accelerator, model, tokenizer, scheduler, args, directory):
    if not accelerator.is_main_process:
        return
    os.makedirs(directory, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    scheduler.save_config(directory)
    with open(os.path.join(directory, "training_args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ddiff.denoiser import tiny_denoiser
    from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler
    from ddiff.training import LANGUAGES, language_tokenizer, mdlm_loss, sample_language, udlm_loss

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)  # identical initial weights on every process

    tokens = LANGUAGES[args.language]
    vocab_size, mask_id = len(tokens), len(tokens) - 1
    block_size = getattr(args, "block_size", None)
    model = tiny_denoiser(vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                          num_heads=args.num_heads, intermediate_size=args.intermediate_size,
                          max_positions=max(64, 2 * args.seq_len),
                          attention="block_causal" if block_size else "bidirectional", block_size=block_size)
    tokenizer = language_tokenizer(args.language)
    process = "absorbing" if args.objective == "mdlm" else "uniform"
    scheduler = TokenDiffusionScheduler(vocab_size=vocab_size, mask_token_id=mask_id, forward_process=process,
                                        alpha_schedule=args.alpha_schedule, eps=args.eps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.98))

    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / max(1, args.warmup_steps)
        progress = (step - args.warmup_steps) / max(1, args.max_train_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # The LR schedule counts optimizer steps whatever the number of processes, so it is stepped
    # by hand after each real optimizer step rather than handed to accelerate (which steps a
    # prepared scheduler once per process).
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    device = accelerator.device
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + accelerator.process_index + 1)
    data_gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index + 7)
    loss_kwargs = dict(alpha_schedule=args.alpha_schedule, eps=args.eps, t_min=args.t_min, generator=gen)
    if args.objective == "mdlm":
        loss_kwargs.update(mask_token_id=mask_id, block_size=block_size)
        loss_fn = mdlm_loss
    else:
        loss_kwargs.update(vocab_size=vocab_size, mask_token_id=mask_id)
        loss_fn = udlm_loss

    accelerator.print(f"ddiff.train {args.objective}: {sum(p.numel() for p in model.parameters())} parameters, "
                      f"{accelerator.num_processes} process(es) on {device}, mixed precision {args.mixed_precision}")
    step, running, count, started = 0, 0.0, 0, time.time()
    while step < args.max_train_steps:
        x0 = sample_language(args.language, args.batch_size, args.seq_len, generator=data_gen).to(device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = loss_fn(model, x0, **loss_kwargs)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                lr_scheduler.step()
            optimizer.zero_grad()
        running += float(loss.detach())
        count += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        if args.log_every and step % args.log_every == 0:
            mean = accelerator.reduce(torch.tensor(running / count, device=device), reduction="mean")
            accelerator.print(f"step {step}/{args.max_train_steps}  loss {float(mean):.4f}  "
                              f"lr {lr_scheduler.get_last_lr()[0]:.2e}  {time.time() - started:.1f}s")
            running, count = 0.0, 0
        if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            accelerator.wait_for_everyone()
            _save(accelerator, model, tokenizer, scheduler, args, os.path.join(args.output_dir, f"checkpoint-{step}"))
    accelerator.wait_for_everyone()
    _save(accelerator, model, tokenizer, scheduler, args, args.output_dir)
    accelerator.print(f"saved to {args.output_dir} after {step} steps ({time.time() - started:.1f}s)")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
