"""DFlash: speculative decoding end to end (AR target vs DFlash) and the full ``dflash_loss`` training step.

Decoding (op ``dflash_decode``; greedy, batch 1, ``NEW_TOKENS`` new tokens per prompt, summed over
the prompts):

* ``tiny``: the committed test assets (tests/assets/tiny_dflash_target: random 4-layer Qwen3,
  hidden 64; tiny_dflash_draft: 2 layers, block 8, trained by scripts/train_tiny_dflash.py on
  the target's greedy continuations of these same prompts, so its acceptance is an upper bound,
  not a generalisation claim), on CPU and on CUDA.
* ``qwen3-8b-shape`` (CUDA only): random weights with Qwen3-8B's shape (36 layers, hidden 4096,
  vocabulary 151936, bf16) and a random drafter with Qwen3-8B-DFlash-b16's shape (5 layers,
  block 16). A random draft is almost never accepted (~1 token per round), so these rows measure
  the cost of a round, not DFlash's speed-up.

Providers: ``hf-generate`` (transformers ``generate(do_sample=False)``, the AR baseline),
``ddiff-ar-block1`` (``DFlashPipeline(block_size=1)``: ddiff's loop with the target alone),
``ddiff-dflash`` (the trained draft on ``tiny``, the random one on ``qwen3-8b-shape``) and
``ddiff-dflash-untrained`` (tiny only). Row fields: ``ms`` (all prompts), ``tokens_per_s``,
``mean_accept`` (tokens per verification round), ``model_ms`` (time inside the target, the draft,
the draft's context projection and the target's embedding / LM head when the draft uses them:
CUDA events / perf_counter around each outermost call) and ``outside_pct`` (the non-model share
of the step time: sampling, acceptance, cache rollback, host syncs, Python).

Training (op ``dflash_loss step``): one ``dflash_loss`` forward + backward: the frozen target's
forward over the sequence, the packed draft forward over N anchor blocks and the chunked
LM-head cross-entropy. CUDA: the Qwen3-8B shapes above, S = 4096 (2048 in quick mode), N = 512,
block 16, fp32 draft weights under bf16 autocast, ``attention_backend`` ``triton`` vs ``flex``,
plus the target forward alone (``target-forward``) for the share it takes. CPU: the tiny assets
with the torch attention reference. ``peak_mb``: peak extra CUDA memory of the step.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import torch

from benchmarks.common import peak_extra_mb, provider_unavailable, synchronize, time_ms

OP_DECODE = "dflash_decode"
OP_LOSS = "dflash_loss step"
NEW_TOKENS = 64
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets")


class _ForwardTimer:
    """Time spent inside the given modules' forwards and methods (outermost calls only, so a module
    called inside another one counts once); CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str, modules, methods=()):
        self.device, self.events, self.depth, self.start = device, [], 0, None
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(lambda *a: self._enter()))
            self.handles.append(m.register_forward_hook(lambda *a: self._exit()))
        self.patched = []
        for obj, name in methods:
            original = getattr(obj, name)

            def timed(*a, _original=original, **kw):
                self._enter()
                try:
                    return _original(*a, **kw)
                finally:
                    self._exit()

            setattr(obj, name, timed)
            self.patched.append((obj, name))

    def _now(self):
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _enter(self):
        self.depth += 1
        if self.depth == 1:
            self.start = self._now()

    def _exit(self):
        self.depth -= 1
        if self.depth == 0:
            self.events.append((self.start, self._now()))

    def reset(self):
        self.events.clear()

    def ms(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events)
        return 1e3 * sum(e - s for s, e in self.events)

    def remove(self):
        for h in self.handles:
            h.remove()
        for obj, name in self.patched:
            delattr(obj, name)  # back to the class method


def _tiny(device: str):
    from transformers import AutoModelForCausalLM

    from ddiff.pipelines import DFlashDraftModel

    target = AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS, "tiny_dflash_target"),
                                                  local_files_only=True).to(device).eval()
    trained = DFlashDraftModel.from_pretrained(os.path.join(ASSETS, "tiny_dflash_draft"), device=device)
    torch.manual_seed(0)
    untrained = DFlashDraftModel(trained.config).to(device).eval()
    with open(os.path.join(ASSETS, "tiny_dflash_draft", "prompts.jsonl")) as f:
        prompts = [torch.tensor([json.loads(line)["input_ids"]], device=device) for line in f if line.strip()]
    return target, {"dflash": trained, "dflash-untrained": untrained}, prompts


def _qwen3_8b(device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ddiff.pipelines import DFlashDraftModel

    cfg = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            target = Qwen3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    torch.manual_seed(0)
    draft = DFlashDraftModel.from_target_config(cfg, 5, block_size=16, mask_token_id=151669).to(device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151643, (1, 64), generator=g).to(device) for _ in range(2)]
    return target, draft, prompts


def _decode_provider(provider, target, draft, prompts):
    from ddiff.pipelines import DFlashPipeline

    if provider == "hf-generate":
        def run():
            for p in prompts:
                target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0)
            return []
        return run
    pipe = DFlashPipeline(draft, target)
    block = 1 if provider == "ddiff-ar-block1" else None

    def run():
        lengths = []
        for p in prompts:
            out = pipe(input_ids=p, max_new_tokens=NEW_TOKENS, block_size=block, stop_token_ids=[],
                       output_type="ids", progress=False)
            lengths += out.acceptance_lengths
        return lengths
    return run


def _decode_rows(name, target, drafts: dict, prompts, device, reps):
    rows = []
    some_draft = next(iter(drafts.values()))
    providers = [("hf-generate", some_draft), ("ddiff-ar-block1", some_draft),
                 *((f"ddiff-{name}", draft) for name, draft in drafts.items())]
    for provider, draft in providers:
        shape = f"{name} prompts{len(prompts)} new{NEW_TOKENS}"
        fn = _decode_provider(provider, target, draft, prompts)
        timer = _ForwardTimer(device, [target, draft, target.get_input_embeddings(), target.get_output_embeddings()],
                              methods=[(draft, "extend_cache")])
        try:
            fn()  # warm-up
            results = []
            for _ in range(reps):
                timer.reset()
                synchronize(device)
                t0 = time.perf_counter()
                lengths = fn()
                synchronize(device)
                total = 1e3 * (time.perf_counter() - t0)
                results.append((total, timer.ms(), lengths))
        finally:
            timer.remove()
        total, model_ms, lengths = sorted(results, key=lambda r: r[0])[len(results) // 2]
        rows.append({"op": OP_DECODE, "shape": shape, "provider": provider, "ms": total,
                     "tokens_per_s": len(prompts) * NEW_TOKENS / (total / 1e3),
                     "mean_accept": sum(lengths) / len(lengths) if lengths else 1.0,
                     "model_ms": model_ms, "outside_pct": 100.0 * max(0.0, 1.0 - model_ms / total)})
    base = next(r for r in rows if r["provider"] == "hf-generate")["ms"]
    for r in rows:
        r["speedup"] = base / r["ms"]
    return rows


def _loss_fn(draft, target, S, N, device, backend, autocast):
    from ddiff.training import dflash_loss

    g = torch.Generator().manual_seed(0)
    vocab = target.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab - 1, (1, S), generator=g).to(device)
    anchors_gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = dflash_loss(draft, target, ids, num_anchors=N, generator=anchors_gen, attention_backend=backend)
        loss.backward()
        draft.zero_grad(set_to_none=True)
    return step


def _loss_rows_cpu():
    target, drafts, _ = _tiny("cpu")
    draft = drafts["dflash"].train()
    S, N = 72, 32
    shape = f"tiny S{S} N{N}x{draft.block_size} fp32"
    rows = [{"op": OP_LOSS, "shape": shape, "provider": "ddiff-torch",
             "ms": time_ms(_loss_fn(draft, target, S, N, "cpu", "torch", False), "cpu", warmup=2, rep=5)}]
    rows.append(provider_unavailable(OP_LOSS, shape, "ddiff-triton", "needs a CUDA device"))
    rows.append(provider_unavailable(OP_LOSS, shape, "flex", f"FlexAttention has no backward on CPU (torch "
                                                             f"{torch.__version__.split('+')[0]})"))
    return rows


def _loss_rows_cuda(target, draft, quick):
    S, N = (2048 if quick else 4096), 512
    shape = f"qwen3-8b-shape S{S} N{N}x16 bf16-autocast"
    draft = draft.float().train()
    rows = []
    for provider, backend in (("ddiff-triton", "triton"), ("flex", "flex")):
        step = _loss_fn(draft, target, S, N, "cuda", backend, True)
        try:
            ms = time_ms(step, "cuda")
            rows.append({"op": OP_LOSS, "shape": shape, "provider": provider, "ms": ms,
                         "peak_mb": peak_extra_mb(step, "cuda")})
        except Exception as e:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
            rows.append(provider_unavailable(OP_LOSS, shape, provider, f"failed: {type(e).__name__}: {str(e)[:100]}"))
        torch.cuda.empty_cache()
    ids = torch.randint(0, 151643, (1, S), device="cuda")
    with torch.no_grad():
        fwd = lambda: target(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)  # noqa: E731
        rows.append({"op": OP_LOSS, "shape": shape, "provider": "target-forward", "ms": time_ms(fwd, "cuda"),
                     "note": "the frozen target's share of each step"})
    return rows


def run(args) -> list[dict]:
    device = getattr(args, "device", "cuda" if torch.cuda.is_available() else "cpu")
    quick = getattr(args, "quick", True)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: one thread is faster on shared cores
    rows = []
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            target, drafts, prompts = _tiny(device)
            rows += _decode_rows("tiny", target, drafts, prompts[:4] if quick else prompts, device, 1 if quick else 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if device == "cuda":
                target, draft, prompts = _qwen3_8b(device)
                with torch.no_grad():
                    rows += _decode_rows("qwen3-8b-shape random", target, {"dflash": draft}, prompts, device,
                                         1 if quick else 3)
                rows += _loss_rows_cuda(target, draft, quick)
                del target, draft
                torch.cuda.empty_cache()
            else:
                shape = f"qwen3-8b-shape random prompts2 new{NEW_TOKENS}"
                rows += [provider_unavailable(OP_DECODE, shape, p, "needs a CUDA device (8B-parameter target)")
                         for p in ("hf-generate", "ddiff-ar-block1", "ddiff-dflash")]
                rows += _loss_rows_cpu()
    finally:
        torch.set_num_threads(threads)
    return rows
