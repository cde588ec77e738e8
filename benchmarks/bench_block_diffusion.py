"""BlockDiffusionPipeline end to end: 256 new tokens, block 32, LLaDA's schedule and Fast-dLLM's threshold.

Model: random weights with LLaDA-8B's shape (Llama layout: 32 layers, hidden 4096, 32 heads,
MLP 12288, vocabulary 126464, bf16) on the GPU; a small config on CPU. It is made
bidirectional by switching off the causal flag of its attention modules, so every provider
runs the same whole-sequence SDPA forward (LLaDA's own attention has no mask either).

Schedules (both whole-sequence forwards, as in LLaDA / Fast-dLLM without cache):
* ``llada``: ``steps_per_block=32`` (LLaDA's even budget: one token per step, 256 forwards);
* ``fast-dllm``: ``threshold=0.9`` (every masked token above 0.9, at least one per step).
  With random weights confidences stay far below 0.9, so it too commits about one token per
  step: the rows measure the per-step cost of the rule, not its speed-up on a trained model.

Providers: ``ddiff-triton`` and ``ddiff-torch`` (the pipeline with that backend; it asks the
model for the current block's logits only) and ``llada-reference`` (LLaDA's ``generate`` loop
restated: float64 Gumbel noise and softmax over the full logits, per-row ``topk``; for the
threshold schedule, Fast-dLLM's threshold rule).

Row fields: ``ms`` (one whole decode), ``tokens_per_s``, ``nfe`` (model forwards), ``fwd_ms``
(time inside the model forward, CUDA events), ``outside_pct`` (share of decode time spent
outside the forward: sampling, selection, bookkeeping, host syncs) and, for ddiff-triton on
CUDA, ``target_met`` (outside_pct <= 3).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import provider_unavailable, synchronize

OP = "block_diffusion"
NEW_TOKENS = 256
BLOCK = 32
PROMPT = 32
TARGET_OUTSIDE_PCT = 3.0


def _config(device: str):
    from transformers import LlamaConfig

    if device == "cuda":
        name, dtype = "llada-8b-shape bf16", torch.bfloat16
        kw = dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=500000.0)
    else:
        name, dtype = "small-cpu fp32", torch.float32
        kw = dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rope_theta=500000.0)
    cfg = LlamaConfig(tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "sdpa"
    return name, cfg, dtype


class _TimedBidirectional(torch.nn.Module):
    """A causal Llama made bidirectional (B = 1, no padding) that times its forwards."""

    def __init__(self, lm, device: str):
        super().__init__()
        self.lm = lm
        self.device_type = device
        for module in lm.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        self.events: list = []

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self):
        return next(self.lm.parameters()).device

    @property
    def dtype(self):
        return next(self.lm.parameters()).dtype

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        # attention_mask is all ones here (one unpadded prompt): pass None, keeping SDPA's fast path
        if self.device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.lm(input_ids=input_ids, logits_to_keep=logits_to_keep, use_cache=False)
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            out = self.lm(input_ids=input_ids, logits_to_keep=logits_to_keep, use_cache=False)
            self.events.append(time.perf_counter() - t0)
        return out

    def forward_ms(self) -> float:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events)
        return 1e3 * sum(self.events)


def _build_model(device: str):
    from transformers import LlamaForCausalLM

    name, cfg, dtype = _config(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return name, _TimedBidirectional(lm.eval(), device)


@torch.no_grad()
def llada_reference(model, prompt, mask_id, threshold=None, steps_per_block=BLOCK, temperature=0.0):
    """LLaDA's generate (``threshold=None``) or Fast-dLLM's threshold variant, as published."""
    gen_length, block_length = NEW_TOKENS, BLOCK
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    nfe = 0
    for nb in range(gen_length // block_length):
        bs, be = P + nb * block_length, P + (nb + 1) * block_length
        mask_num = (x[:, bs:be] == mask_id).sum(dim=1, keepdim=True)
        base, rem = mask_num // steps_per_block, mask_num % steps_per_block
        schedule = torch.zeros(1, steps_per_block, dtype=torch.int64, device=x.device) + base
        schedule[0, : rem[0]] += 1
        i = 0
        while True:
            mask_index = x == mask_id
            if threshold is None and i >= steps_per_block:
                break
            if threshold is not None and not bool(mask_index[:, bs:be].any()):
                break
            logits = model(x).logits
            nfe += 1
            if temperature > 0:
                noise = torch.rand_like(logits, dtype=torch.float64)
                x0 = torch.argmax(logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, be:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, float("-inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                if threshold is None:
                    _, idx = torch.topk(confidence[j], k=schedule[j, i])
                    transfer[j, idx] = True
                else:
                    passed = confidence[j] > threshold
                    if not bool(passed.any()):
                        passed[torch.argmax(confidence[j])] = True
                    transfer[j] = passed
            x[transfer] = x0[transfer]
            i += 1
    return x[:, P:], nfe


def _decode_fn(provider, model, prompt, mask_id, schedule):
    from ddiff.pipelines import BlockDiffusionPipeline

    rule = {"steps_per_block": BLOCK} if schedule == "llada" else {"threshold": 0.9}
    if provider == "llada-reference":
        return lambda: llada_reference(model, prompt, mask_id, threshold=rule.get("threshold"))[1]
    pipe = BlockDiffusionPipeline(model, mask_token_id=mask_id, attention="bidirectional",
                                  attention_mask_format="2d", backend=provider.split("-")[1])

    def run():
        out = pipe(input_ids=prompt, max_new_tokens=NEW_TOKENS, block_length=BLOCK, eos_early_stop=False,
                   output_type="ids", progress=False, **rule)
        return out.nfe

    return run


def run(args) -> list[dict]:
    device = args.device
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: one thread is faster on shared cores
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, device: str) -> list[dict]:
    name, model = _build_model(device)
    mask_id = model.config.vocab_size - 128  # LLaDA's 126336 in its 126464-token vocabulary
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g)
    prompt = torch.where(prompt == mask_id, 0, prompt).to(device)
    reps = 3  # the median of three decodes: one slow moment of a shared machine does not decide the row
    rows = []
    for schedule in ("llada", "fast-dllm"):
        shape = f"{name} new{NEW_TOKENS} block{BLOCK} {schedule}"
        for provider in ("ddiff-triton", "ddiff-torch", "llada-reference"):
            if provider == "ddiff-triton" and device != "cuda":
                rows.append(provider_unavailable(OP, shape, provider, "needs a CUDA device"))
                continue
            fn = _decode_fn(provider, model, prompt, mask_id, schedule)
            fn()  # warm-up (Triton compilation and autotuning, allocator, first-call caches)
            results = []
            for _ in range(reps):
                model.events.clear()
                synchronize(device)
                t0 = time.perf_counter()
                nfe = fn()
                synchronize(device)
                total_ms = 1e3 * (time.perf_counter() - t0)
                results.append((total_ms, model.forward_ms(), nfe))
            total_ms, fwd_ms, nfe = sorted(results)[len(results) // 2]
            outside = 100.0 * max(0.0, 1.0 - fwd_ms / total_ms)
            row = {"op": OP, "shape": shape, "provider": provider, "ms": total_ms,
                   "tokens_per_s": NEW_TOKENS / (total_ms / 1e3), "nfe": nfe, "fwd_ms": fwd_ms,
                   "outside_pct": outside}
            if provider == "ddiff-triton":
                row["target_met"] = outside <= TARGET_OUTSIDE_PCT
            if schedule == "fast-dllm":
                row["note"] = "random weights: ~1 token/step"
            rows.append(row)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows
