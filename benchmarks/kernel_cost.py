"""Static cost of ddiff's Triton kernels on Hopper (sm_90), read from the compiled code without a GPU.

``python -m benchmarks.kernel_cost`` writes ``benchmarks/results/kernel-cost-sm90.{json,md}``;
``--quick`` compiles one launch of every kernel configuration (every confidence kind and dtype once,
the anchor-attention configurations), checks it and traces nothing (the test suite runs it);
``--source DIR`` costs the kernels of another checkout (``git worktree add DIR <commit>``).

For every case (an op call at a benchmark's ``--full`` shape, or a coverage call):

1. **Capture.** The case calls the public op on CPU tensors that report ``device == cuda:0`` to a
   host that believes it drives a 132-SM sm_90 part (``torch.cuda.get_device_properties`` answers
   for an H100). The launchers therefore pick their real GPU configuration (tile sizes, split-row
   parts, warps); each ``wrap(kernel)[grid](*args, **kwargs)`` is recorded instead of launched.
2. **Specialise as the JIT does.** The recorded arguments go through the binder that
   ``JITFunction.run`` builds (``create_function_from_signature`` + ``native_specialize_impl``,
   the same code in triton 3.6 and 3.9): pointers aligned like the caching allocator's (512 B +
   the view's offset) get ``tt.divisibility=16``, integers divisible by 16 likewise, an integer 1
   and ``None`` become constexprs, and ``JITFunction._pack_args`` turns that into the signature,
   constexprs and attributes the JIT compiles.
3. **Compile** for ``GPUTarget("cuda", 90, 32)`` with the ptxas that triton ships (triton's own
   command line; its ``-v`` report is captured: registers, stack, spill stores and loads).
4. **Read the SASS** (``nvdisasm -gi``): the control-flow graph, its natural loops, and per loop the
   warp-instructions on the shortest path round the loop (a lower bound of the issue cost of one
   iteration), the instructions in the body, block barriers (``BAR``), shuffles (``SHFL``), global
   loads (``LDG``/``LDGSTS``: count and bytes per thread) and tensor-core instructions. Each SASS loop
   is tied to its source loop through the line table (the inlining chain of its instructions).
5. **Count trips** (full mode): the same case runs again in a subprocess under the Triton
   interpreter, on random data, with a line tracer that counts iterations of every source loop per
   program (a declared subset of programs: every row of a grid does the same work on random data,
   and so does every head of anchor attention). Untraced programs take a traced representative's
   counts.
6. **Bound.** Per launch, the issue time ``sum(warp-instructions) / (schedulers in use x clock)``
   and the critical path of the longest program; per case, the larger of the summed launch bounds
   and the compulsory HBM bytes over the bandwidth. From these: an upper bound of the fraction of
   HBM bandwidth the case can reach, and a lower bound of its time. The bound assumes perfect
   latency hiding, no launch gaps, one warp-instruction per scheduler per cycle: the hardware can
   only be slower.

The machine model is stated in the output (``MACHINES``, ``SM90``).
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import functools
import heapq
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import io
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import warnings
from typing import Callable, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------
# Machine model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Machine:
    """One Hopper part: what bounds a memory-bound kernel."""

    name: str
    hbm_bytes_per_s: float
    sms: int = 132
    schedulers_per_sm: int = 4
    clock_hz: float = 1.98e9
    tensor_flops_per_s: float = 990e12  # dense bf16/fp16, whole chip

    def thread_instructions_per_bf16(self) -> float:
        """Issue slots (thread-instructions) per bf16 element at full HBM bandwidth."""
        return self.sms * self.schedulers_per_sm * 32 * self.clock_hz / (self.hbm_bytes_per_s / 2)


# 132 SMs, 4 schedulers per SM issuing one warp-instruction per cycle, 1.98 GHz: the SM clock seen
# under load on this workplace's H200 (/work/.library/device/KINDS.md) and the H100 SXM's boost
# clock. HBM: 3.35 TB/s (H100 SXM 80 GB) and 4.8 TB/s (H200), the vendor datasheets quoted in
# /work/.library/device/H200.md; the measured copy on the H200 moved ~4.3 TB/s (KINDS.md). Dense
# bf16 tensor-core rate: ~990 TFLOP/s on both (H200.md; 788 TFLOP/s measured on the H200, KINDS.md).
MACHINES = (Machine("H100 SXM", 3.35e12), Machine("H200", 4.8e12))

# Per-SM limits of compute capability 9.0 (CUDA programming guide): registers, warps, CTAs,
# shared memory (228 KB per SM, 1 KB of it reserved per resident CTA).
SM90 = dict(regs_per_sm=65536, reg_alloc_unit_per_warp=256, max_regs_per_thread=255, max_warps_per_sm=64,
            max_ctas_per_sm=32, smem_per_sm=228 * 1024, smem_reserved_per_cta=1024)

# Case names the issue's targets are judged on (see ``_targets``).
TARGET_SAMPLE = "sample B=256 V=151936 bf16"
TARGET_FILTERED = ("sample+top_k50+top_p0.9 B=64 V=151936 bf16", "sample+top_k50+top_p0.9 B=1 V=151936 bf16")
TARGET_DLLM = "decode step: LLaDA block of 32: [1,1024,126464] masked 32"
TARGET_ATTENTION = "anchor_attention fwd+bwd B1 Hq32/8 D128 S4096 N512x16 bfloat16"


# ---------------------------------------------------------------------------------------------
# Which ddiff to cost
# ---------------------------------------------------------------------------------------------


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Resolves ``ddiff`` to ``<root>/ddiff`` and ``ddiff.kernels[.x]`` to ``<root>/kernels`` (the
    editable install maps both to the working tree, which is not the checkout asked for). Nothing
    else is redirected: ``benchmarks`` stays this one."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name == "ddiff":
            base = os.path.join(self.root, "ddiff")
        elif name == "ddiff.kernels" or name.startswith("ddiff.kernels."):
            base = os.path.join(self.root, "kernels", *name.split(".")[2:])
        else:
            return None
        if os.path.isdir(base):
            init = os.path.join(base, "__init__.py")
            if not os.path.exists(init):  # kernels/ is a namespace folder (no __init__.py) since issue 16
                spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
                spec.submodule_search_locations = [base]
                return spec
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[base])
        if os.path.exists(base + ".py"):
            return importlib.util.spec_from_file_location(name, base + ".py")
        return None


def use_source(root: Optional[str]) -> str:
    """Import ddiff from the checkout ``root`` (before anything imports it); returns the root used."""
    if root is None:
        import ddiff

        return os.path.dirname(os.path.dirname(os.path.abspath(ddiff.__file__)))
    root = os.path.abspath(root)
    if "ddiff" in sys.modules:
        raise RuntimeError("use_source() must run before ddiff is imported")
    sys.meta_path.insert(0, _SourceFinder(root))
    import ddiff
    import ddiff.kernels
    import ddiff.ops

    for mod in (ddiff, ddiff.kernels, ddiff.ops):
        where = list(mod.__spec__.submodule_search_locations or [mod.__file__])[0]
        if not os.path.abspath(where).startswith(root + os.sep):
            raise RuntimeError(f"{mod.__name__} was imported from {where}, not from {root}")
    return root


def _git_describe(root: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "kernels", "ddiff"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" + uncommitted changes in kernels/ or ddiff/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Kernels: discovery from the modules
# ---------------------------------------------------------------------------------------------


def _jit_types():
    from triton.runtime.jit import JITFunction

    types_ = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        types_.append(InterpretedFunction)
    except ImportError:
        pass
    return tuple(types_)


def _python_fn(jit_fn):
    return jit_fn.fn


def discover_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function of ``ddiff.kernels.*`` that no other one uses (calls, or
    passes on, as a ``tl.reduce`` combine function): the kernels.

    Keys are ``module:name`` (module relative to ``ddiff.kernels``).
    """
    import ddiff.kernels as pkg

    jit_types = _jit_types()
    functions = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, jit_types) and _python_fn(obj).__module__ == mod.__name__:
                functions[f"{info.name}:{name}"] = obj
    used = set()
    for obj in functions.values():
        tree = ast.parse(textwrap.dedent(inspect.getsource(_python_fn(obj))))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
    return {key: obj for key, obj in functions.items() if key.split(":")[1] not in used}


def kernel_key(jit_fn) -> str:
    fn = _python_fn(jit_fn)
    return f"{fn.__module__.rsplit('.', 1)[-1]}:{fn.__name__}"


# ---------------------------------------------------------------------------------------------
# Capture: run an op as if on a GPU, record its launches
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TensorArg:
    """A tensor argument as the JIT sees it: dtype and the address alignment of its first element."""

    dtype: object
    shape: tuple
    stride: tuple
    storage_offset: int
    element_size: int

    def data_ptr(self) -> int:
        # The caching allocator hands out 512-byte aligned blocks; a view starts at its offset.
        return (1 << 20) + self.storage_offset * self.element_size


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction (or InterpretedFunction in the trace worker)
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return kernel_key(self.kernel)


def _grid_tuple(grid, kernel, args, kwargs) -> tuple:
    if callable(grid):
        names = inspect.signature(_python_fn(kernel)).parameters
        grid = grid(dict(zip(names, args), **kwargs))
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


class _Recorder:
    """What ``wrap(kernel)`` returns during a capture: ``[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, sink: list, on_launch=None):
        self.kernel, self.sink, self.on_launch = kernel, sink, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            record = Launch(self.kernel, _grid_tuple(grid, self.kernel, args, kwargs), args, kwargs)
            if self.on_launch is not None:
                self.on_launch(record)
            self.sink.append(Launch(record.kernel, record.grid, tuple(_freeze(a) for a in args), dict(kwargs)))

        return launch


def _freeze(arg):
    import torch

    if isinstance(arg, torch.Tensor):
        return TensorArg(arg.dtype, tuple(arg.shape), tuple(arg.stride()), arg.storage_offset(), arg.element_size())
    return arg


@contextlib.contextmanager
def pretend_cuda(on_launch=None):
    """Run ddiff's ops on CPU tensors that claim to live on ``cuda:0``; yields the launch list.

    Tensors made inside are real CPU tensors of a subclass whose ``device`` is ``cuda:0`` (factory
    calls asked for CUDA get the CPU, and uninitialised allocations are zeroed so that programs
    skipped by the tracer leave defined data). ``torch.cuda`` answers for a 132-SM sm_90 part
    with 227 KB of shared memory per block. The triton ops run their Python body directly (the
    dispatcher would otherwise see CPU tensors), and every ``launch_wrapper()`` returns a
    recorder; ``on_launch(launch)`` runs the kernel too when given (the trace worker).
    """
    import torch
    from torch._library.custom_ops import CustomOpDef
    from torch.overrides import TorchFunctionMode

    import ddiff._backend
    import ddiff.ops

    cuda = torch.device("cuda", 0)

    class OnCuda(torch.Tensor):
        device = property(lambda self: cuda)
        is_cuda = property(lambda self: True)
        is_cpu = property(lambda self: False)

    def to_cpu_device(value):
        if isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda":
            return torch.device("cpu")
        return value

    def mark(value):
        if isinstance(value, torch.Tensor) and not isinstance(value, OnCuda):
            return value.as_subclass(OnCuda)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(mark(v) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)([mark(v) for v in value])
        return value

    uninitialised = {torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty,
                     torch.Tensor.new_empty_strided}

    class PretendCuda(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = to_cpu_device(kwargs["device"])
            if func is torch.Tensor.cuda:
                func, args = torch.Tensor.to, (args[0], torch.device("cpu"))
            elif func is torch.Tensor.to:
                args = tuple(to_cpu_device(a) for a in args)
            out = func(*args, **kwargs)
            if func in uninitialised and isinstance(out, torch.Tensor):
                with torch._C.DisableTorchFunction():
                    out.zero_()
            return mark(out)

    launches: list[Launch] = []
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3 (pretended)", major=9, minor=0,
                                  multi_processor_count=MACHINES[0].sms, shared_memory_per_block=48 * 1024,
                                  shared_memory_per_block_optin=227 * 1024, total_memory=80 * 2**30,
                                  warp_size=32)
    cuda_patches = dict(get_device_properties=lambda *a, **k: props, current_device=lambda: 0,
                        get_device_capability=lambda *a, **k: (9, 0), is_available=lambda: True,
                        device_count=lambda: 1, get_device_name=lambda *a, **k: props.name)
    saved_cuda = {name: getattr(torch.cuda, name) for name in cuda_patches}
    recorder = lambda kernel: _Recorder(kernel, launches, on_launch)  # noqa: E731
    wrapper_patches = [(ddiff._backend, "launch_wrapper")]
    op_impls = {}
    for info in pkgutil.iter_modules(ddiff.ops.__path__):
        mod = importlib.import_module(f"ddiff.ops.{info.name}")
        if hasattr(mod, "launch_wrapper"):
            wrapper_patches.append((mod, "launch_wrapper"))
        for obj in vars(mod).values():
            if isinstance(obj, CustomOpDef) and obj._namespace == "ddiff" and "_triton" in obj._name:
                op_impls[obj._name] = obj._init_fn
    saved_wrappers = [(mod, name, getattr(mod, name)) for mod, name in wrapper_patches]
    namespace = torch.ops.ddiff
    saved_ops = {name: namespace.__dict__.get(name) for name in op_impls}
    try:
        for name, fn in cuda_patches.items():
            setattr(torch.cuda, name, fn)
        for mod, name, _ in saved_wrappers:
            setattr(mod, name, lambda: recorder)
        for name, fn in op_impls.items():
            setattr(namespace, name, fn)
        with PretendCuda():
            yield launches
    finally:
        for name, fn in saved_cuda.items():
            setattr(torch.cuda, name, fn)
        for mod, name, fn in saved_wrappers:
            setattr(mod, name, fn)
        for name, old in saved_ops.items():
            if old is None:
                namespace.__dict__.pop(name, None)
            else:
                setattr(namespace, name, old)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TracePolicy:
    """Which programs of a launch the trace worker interprets, and which traced program stands in
    for each other one (``rep``)."""

    describe: str
    select: Callable[[tuple, tuple], bool]  # (pid, grid) -> traced?
    rep: Callable[[tuple, tuple], tuple]  # (pid, grid) -> a traced pid with the same work


TRACE_ALL = TracePolicy("every program", lambda pid, grid: True, lambda pid, grid: pid)


def trace_rows(k: int) -> TracePolicy:
    """Programs with ``pid0 < k`` (every part of those rows); row ``r`` costs as row ``r % k``."""
    return TracePolicy(f"rows 0..{k - 1} (every row does the same work on random data)",
                       lambda pid, grid: pid[0] < k, lambda pid, grid: (pid[0] % k,) + pid[1:])


def trace_first_head(batch: int) -> TracePolicy:
    """Axis 1 = batch x heads: trace the first head of each batch row; every head of a row does
    the same work (the work depends on the anchors, which are per batch row)."""

    def heads(grid):
        return grid[1] // batch

    return TracePolicy("the first head of each batch row (heads of a row do the same work)",
                       lambda pid, grid: pid[1] % heads(grid) == 0,
                       lambda pid, grid: (pid[0], pid[1] - pid[1] % heads(grid), pid[2]))


@dataclasses.dataclass
class Case:
    name: str
    group: str
    run: Callable[[], dict]  # called inside pretend_cuda(); returns {"bytes": compulsory HBM bytes, ...}
    trace: Optional[TracePolicy] = TRACE_ALL  # None: compile coverage only, no trip counts
    stream_itemsize: Optional[int] = 2  # element size of the streamed input (per-element costs)
    source: str = ""  # where the shape comes from
    quick: bool = False


def _randn(*shape, dtype, scale=3.0):
    import torch

    # Benchmarks draw logits as randn * 3 (bench_sampling, bench_decoding).
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def _sampling_cases() -> list[Case]:
    import torch

    import ddiff
    from benchmarks import bench_sampling

    cases = []
    for filtered in (False, True):
        kw = dict(temperature=0.8, top_k=50, top_p=0.9) if filtered else dict(temperature=0.8)
        op = "sample+top_k50+top_p0.9" if filtered else "sample"
        for vocab in bench_sampling.FULL_VOCABS:
            for batch in bench_sampling.FULL_BATCHES:
                def run(batch=batch, vocab=vocab, kw=kw):
                    logits = _randn(batch, vocab, dtype=torch.bfloat16)
                    with ddiff.sync_checks(False):
                        ddiff.sample(logits, seed=1, **kw)
                    return {"bytes": logits.numel() * 2, "rows": batch}

                cases.append(Case(f"{op} B={batch} V={vocab} bf16", "sample", run,
                                  trace=trace_rows(1 if filtered else 2), source="bench_sampling --full"))
    for batch in (1, 64):
        def run_filter(batch=batch):
            logits = _randn(batch, 151936, dtype=torch.bfloat16)
            with ddiff.sync_checks(False):
                ddiff.filter_logits(logits, top_k=50, top_p=0.9)
            return {"bytes": logits.numel() * 4, "rows": batch}  # read once, write once

        cases.append(Case(f"filter_logits top_k50+top_p0.9 B={batch} V=151936 bf16", "filter_logits", run_filter,
                          trace=trace_rows(1), source="sample's filtered shape (no benchmark grid of its own)"))
    return cases


def _decode_step(batch, length, vocab, block, *, commit=4):
    import torch

    import ddiff

    logits = _randn(batch, length, vocab, dtype=torch.bfloat16)
    mask_id = vocab - 1
    x = torch.randint(0, vocab - 1, (batch, length), device="cuda")
    x[:, block[0]:block[1]] = mask_id
    with ddiff.sync_checks(False):
        mask = x == mask_id
        tokens, conf = ddiff.predict_tokens(logits, mask, 0.7, confidence="prob", seed=0)
        ddiff.select_transfer(conf, mask, num_transfer=commit)
    masked = batch * (block[1] - block[0])
    return {"bytes": masked * vocab * 2, "rows": masked}


def _decoding_cases() -> list[Case]:
    from benchmarks import bench_decoding

    cases = []
    for name, batch, length, vocab, block in bench_decoding._cases(types.SimpleNamespace(device="cuda")):
        masked = block[1] - block[0]
        policy = TRACE_ALL if masked < length else trace_rows(2)
        cases.append(Case(f"decode step: {name}: [{batch},{length},{vocab}] masked {masked}", "decode step",
                          functools.partial(_decode_step, batch, length, vocab, block,
                                            commit=bench_decoding.COMMIT_PER_ROW),
                          trace=policy, source="bench_decoding (CUDA cases)"))
    return cases


def _token_diffusion_cases() -> list[Case]:
    import torch

    import ddiff
    from benchmarks import bench_token_diffusion as btd

    s = btd._shape("cuda", quick=False)
    shape = (s["B"], s["L"], s["V"])

    def mdlm():
        logits = _randn(*shape, dtype=s["dtype"])
        x = torch.full(shape[:2], btd.MASK, dtype=torch.long, device="cuda")
        with ddiff.sync_checks(False):
            ddiff.mdlm_step(logits, x, btd.MASK, torch.tensor(0.5), torch.tensor(0.6), seed=0)
        return {"bytes": logits.numel() * 2 // 5, "rows": shape[0] * shape[1]}  # ~1/5 of the rows revealed

    def udlm():
        logits = _randn(*shape, dtype=s["dtype"])
        x = torch.randint(0, s["V"], shape[:2], device="cuda")
        with ddiff.sync_checks(False):
            ddiff.udlm_step(logits, x, torch.tensor(0.5), torch.tensor(0.6), seed=0)
        return {"bytes": logits.numel() * 2, "rows": shape[0] * shape[1]}

    label = f"[{s['B']},{s['L']},{s['V']}] bf16"
    return [Case(f"mdlm_step {label} (a_t=0.5, a_s=0.6)", "token diffusion", mdlm, trace=trace_rows(64),
                 source="bench_token_diffusion --full"),
            Case(f"udlm_step {label} (a_t=0.5, a_s=0.6)", "token diffusion", udlm, trace=trace_rows(2),
                 source="bench_token_diffusion shape")]


def _anchor_attention(s):
    """Forward and backward through the registered triton ops (the autograd function's two halves)."""
    import torch

    from ddiff.kernels import anchor_attention as ka

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, S, N, bs = (s[k] for k in ("B", "Hq", "Hkv", "D", "S", "N", "bs"))
    anchors = torch.randint(0, S + 1, (B, N), generator=g).to("cuda")
    mk = lambda *shape: torch.randn(*shape, generator=g).to("cuda", s["dtype"])  # noqa: E731
    q, k, v = mk(B, Hq, N * bs, D), mk(B, Hkv, S + N * bs, D), mk(B, Hkv, S + N * bs, D)
    do = mk(B, Hq, N * bs, D)
    anc, perm = ka.sort_blocks(anchors, None)
    scale = D ** -0.5
    out, lse = torch.ops.ddiff.anchor_attention_triton(q, k, v, anc, perm, S, bs, scale, None)
    torch.ops.ddiff.anchor_attention_triton_backward(do, q, k, v, out, lse, anc, perm, S, bs, scale, None)
    # Live (query, key) pairs over every (batch, query head): block b sees anchors[b] + bs keys.
    live = int((anchors.to(torch.int64) + bs).sum()) * bs * Hq
    nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, do)) * 2  # inputs read, gradients written
    # Matrix products per live (query, key) pair: forward S = QK^T and O += PV; dk/dv recomputes S
    # and forms dV += P^T dO, dP = dO V^T, dK += dS^T Q; dq recomputes S and forms dP and dQ += dS K.
    products = {"_anchor_attn_fwd": 2, "_anchor_attn_bwd_dkdv": 4, "_anchor_attn_bwd_dq": 3}
    return {"bytes": nbytes, "live_pairs": live, "head_dim": D, "products": products}


def _attention_label(s) -> str:
    from benchmarks import bench_anchor_attention

    return bench_anchor_attention._label(s)  # the benchmark's shape label, so that it finds its bounds


def _attention_cases() -> list[Case]:
    from benchmarks import bench_anchor_attention

    return [Case(f"anchor_attention fwd+bwd {_attention_label(s)}", "anchor attention",
                 functools.partial(_anchor_attention, s), trace=trace_first_head(s["B"]), stream_itemsize=None,
                 source="bench_anchor_attention --full")
            for s in bench_anchor_attention._shapes("cuda", quick=False)]


def _coverage_cases() -> list[Case]:
    """One launch of every kernel configuration the compile check has always covered: every
    confidence kind and dtype once (filtered and not, with and without mask / suppress / gate /
    query), sample's two paths, filter_logits, the selection rules, and the attention configs."""
    import torch

    import ddiff

    cases = []
    kinds = (("prob", torch.bfloat16, "raw"), ("margin", torch.float16, "sampling"),
             ("neg_entropy", torch.float32, "raw"), ("random", torch.bfloat16, "sampling"))
    for i, (confidence, dtype, source) in enumerate(kinds):
        dt = str(dtype).replace("torch.", "")
        for filtered in (False, True):
            # Quick mode: each kind and dtype once, filtered and unfiltered alternating; full: all.
            quick = filtered == (i % 2 == 0)
            def run(confidence=confidence, dtype=dtype, source=source, filtered=filtered):
                logits = _randn(2, 8, 32000, dtype=dtype)
                mask = torch.ones(2, 8, dtype=torch.bool, device="cuda")
                kw = dict(temperature=0.7, top_k=50, top_p=0.9) if filtered else dict(
                    temperature=0.0, suppress_tokens=[0, 1])
                with ddiff.sync_checks(False):
                    ddiff.predict_tokens(logits, None if filtered else mask, confidence=confidence,
                                         confidence_from=source, seed=0, **kw)
                return {"bytes": logits.numel() * logits.element_size(), "rows": 16}

            what = "top_k50+top_p0.9" if filtered else "mask+suppress"
            cases.append(Case(f"cover predict_tokens {confidence}/{source} {what} {dt}", "coverage", run,
                              trace=None, stream_itemsize=dtype.itemsize, quick=quick))

    def mdlm():
        logits = _randn(2, 16, 32000, dtype=torch.bfloat16)
        x = torch.full((2, 16), 31999, dtype=torch.long, device="cuda")
        with ddiff.sync_checks(False):
            ddiff.mdlm_step(logits, x, 31999, torch.tensor(0.5), torch.tensor(0.6), top_p=0.9, seed=0)
        return {"bytes": logits.numel() * 2, "rows": 32}

    def udlm():
        logits = _randn(2, 16, 32000, dtype=torch.float16)
        x = torch.randint(0, 32000, (2, 16), device="cuda")
        with ddiff.sync_checks(False):
            ddiff.udlm_step(logits, x, torch.tensor(0.5), torch.tensor(0.6), seed=torch.arange(32, device="cuda"))
        return {"bytes": logits.numel() * 2, "rows": 32}

    def sample_per_row():
        logits = _randn(4, 151936, dtype=torch.bfloat16)
        with ddiff.sync_checks(False):
            ddiff.sample(logits, temperature=torch.tensor([0.0, 0.5, 1.0, 2.0], device="cuda"),
                         seed=torch.tensor([1, 2, 3, 4], device="cuda"))
            ddiff.sample(logits.half(), temperature=0.9, top_k=torch.tensor([1, 5, 50, 0], device="cuda"),
                         min_p=0.05, seed=3)
        return {"bytes": logits.numel() * 6, "rows": 4}

    def filter_min_p():
        logits = _randn(4, 151936, dtype=torch.bfloat16)
        with ddiff.sync_checks(False):
            ddiff.filter_logits(logits, top_k=50, min_p=0.1)
        return {"bytes": logits.numel() * 4, "rows": 4}

    def selection():
        conf = torch.rand(2, 1024, device="cuda")
        mask = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
        with ddiff.sync_checks(False):
            ddiff.select_transfer(conf, mask, num_transfer=4)
            ddiff.select_transfer(conf, mask, threshold=0.9)
            ddiff.select_transfer(conf, mask, num_transfer=torch.tensor([1, 2], device="cuda"), threshold=0.5)
            ddiff.select_transfer(conf.half(), mask, threshold=torch.tensor([0.9, 0.8], device="cuda"))
            ddiff.select_transfer(conf, mask, factor=1.0)
        return {"bytes": conf.numel() * 5 * 5, "rows": 2}

    def renoise():
        tokens = torch.randint(0, 151936, (4, 1024), device="cuda")
        keep = torch.rand(4, 1024, device="cuda") < 0.5
        with ddiff.sync_checks(False):
            ddiff.ops.renoise_uniform(tokens, keep, vocab_size=151936, seed=0)
        return {"bytes": tokens.numel() * 17, "rows": 4}

    if hasattr(ddiff.ops, "renoise_uniform"):  # not in every checkout the tool costs
        cases.append(Case("cover renoise_uniform [4,1024]", "coverage", renoise, trace=None, stream_itemsize=8,
                          quick=True))
    cases += [Case("cover mdlm_step gate+top_p bf16", "coverage", mdlm, trace=None, quick=True),
              Case("cover udlm_step query fp16", "coverage", udlm, trace=None, quick=True),
              Case("cover sample per-row temperature/seed, fp16 top_k+min_p", "coverage", sample_per_row, trace=None,
                   quick=True),
              Case("cover filter_logits top_k+min_p bf16", "coverage", filter_min_p, trace=None, quick=True),
              Case("cover select_transfer top-k / threshold / both / per-row / factor", "coverage", selection,
                   trace=None, stream_itemsize=4, quick=True)]
    import torch as _t

    # The configurations of the old compile check in quick mode; fp32 at D=128 (slow to compile:
    # its products unroll into FMAs) in full mode only.
    for dtype, head_dim in ((_t.bfloat16, 64), (_t.bfloat16, 128), (_t.float32, 64), (_t.float32, 128)):
        s = dict(B=1, Hq=4, Hkv=2, D=head_dim, S=256, N=64, bs=16, dtype=dtype)
        cases.append(Case(f"cover anchor_attention {_attention_label(s)}", "coverage",
                          functools.partial(_anchor_attention, s), trace=None, stream_itemsize=None,
                          quick=(dtype, head_dim) != (_t.float32, 128)))
    return cases


def all_cases(quick: bool) -> list[Case]:
    if quick:
        return [c for c in _coverage_cases() if c.quick]
    return _sampling_cases() + _decoding_cases() + _token_diffusion_cases() + _attention_cases() + _coverage_cases()


def capture(case: Case) -> tuple[list[Launch], dict]:
    import torch

    torch.manual_seed(0)
    with pretend_cuda() as launches:
        info = case.run()
    return launches, info


# ---------------------------------------------------------------------------------------------
# Specialise and compile as the JIT would
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileSpec:
    kernel: str
    jit_fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str
    num_warps: int
    num_stages: int

    def constexpr_summary(self) -> dict:
        names = list(inspect.signature(_python_fn(self.jit_fn)).parameters)
        out = {}
        for path, value in self.constexprs.items():
            name = names[path[0]] if isinstance(path, tuple) else str(path)
            if value is None:
                out[name] = "None"
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:
                out[name] = str(value)
        return out


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


@functools.lru_cache(maxsize=None)
def _backend():
    from triton.compiler import make_backend

    return make_backend(_target())


def specialise(launch: Launch) -> CompileSpec:
    """The signature, constexprs, attributes and options ``JITFunction.run`` would compile."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = _backend()
    kwargs = dict(launch.kwargs)
    # JITFunction.run adds these before binding (the last two only where this triton has them).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    fields = {f.name for f in dataclasses.fields(type(backend.parse_options({})))}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if name in fields and hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    key = str(tuple(specialization)) + str(options)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return CompileSpec(kernel_key(fn), fn, signature, constexprs, attrs, options.__dict__,
                       f"{kernel_key(fn)}|{key}", options.num_warps, options.num_stages)


@dataclasses.dataclass
class Compiled:
    spec: CompileSpec
    ptxas_log: str
    cubin: bytes
    shared: int
    sass: str
    seconds: float
    error: Optional[str] = None


def _tool_path(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def compile_spec(spec: CompileSpec) -> Compiled:
    """Compile for sm_90 with triton's ptxas (its ``-v`` report captured) and disassemble."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    start = time.perf_counter()
    log = io.StringIO()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    try:
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # ptxas must run for its report
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(spec.jit_fn, spec.signature, spec.constexprs, spec.attrs),
                                      target=_target(), options=spec.options)
    except Exception as exc:  # a compile error is a result of the check, reported per variant
        return Compiled(spec, log.getvalue(), b"", 0, "", time.perf_counter() - start,
                        error=f"{type(exc).__name__}: {exc}"[-4000:])
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool_path("nvdisasm"), "-c", "-gi", f.name], capture_output=True, text=True,
                              check=True).stdout
    return Compiled(spec, log.getvalue(), cubin, int(compiled.metadata.shared), sass, time.perf_counter() - start)


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame, spill stores / loads and barriers from ptxas' ``-v`` report."""
    def grab(pattern, default=0):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else default

    if "Used" not in log:
        raise RuntimeError(f"no ptxas resource report in the compile log:\n{log[-2000:]}")
    return dict(registers=grab(r"Used (\d+) registers"), stack_bytes=grab(r"(\d+) bytes stack frame"),
                spill_store_bytes=grab(r"(\d+) bytes spill stores"), spill_load_bytes=grab(r"(\d+) bytes spill loads"),
                named_barriers=grab(r"used (\d+) barriers"))


# ---------------------------------------------------------------------------------------------
# SASS: control flow, loops, per-iteration costs
# ---------------------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FILE = re.compile(r'//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_PRED = re.compile(r"^@(!?)(U?P[T0-9]+)\s+")


@dataclasses.dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    text: str
    pred: Optional[str]  # "P0", "!P1", ... or None
    chain: tuple  # ((file, line), ...) innermost first

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def never(self) -> bool:
        return self.pred == "!PT"

    @property
    def always(self) -> bool:
        return self.pred is None or self.pred == "PT"


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions (with their inlining chains) and label -> instruction index."""
    instrs, labels, chain, group, in_group = [], {}, (), [], False
    for line in text.splitlines():
        m = _FILE.search(line)
        if m:
            if not in_group:
                group, in_group = [], True
            group.append((m.group(1), int(m.group(2))))
            continue
        if in_group:
            chain, in_group = tuple(group), False
        lm = _LABEL.match(line.strip())
        if lm:
            labels[lm.group(1)] = len(instrs)
            continue
        im = _INSTR.match(line)
        if not im:
            continue
        body = im.group(2).strip()
        pred = None
        pm = _PRED.match(body)
        if pm:
            pred = ("!" if pm.group(1) else "") + pm.group(2)
            body = body[pm.end():]
        opcode = body.split()[0]
        instrs.append(Instr(int(im.group(1), 16), opcode, body, pred, chain))
    return instrs, labels


@dataclasses.dataclass
class Block:
    start: int
    end: int  # exclusive
    succ: list


def build_cfg(instrs: list[Instr], labels: dict[str, int]) -> list[Block]:
    """Basic blocks reachable from the entry (code after the kernel's final EXIT, such as the
    self-branch padding and subroutines reached only by CALL, is dropped)."""
    n = len(instrs)
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.op in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "BREAK") and i + 1 < n:
            leaders.add(i + 1)
        t = _TARGET.search(ins.text)
        if ins.op in ("BRA", "JMP") and t and t.group(1) in labels:
            leaders.add(labels[t.group(1)])
    leaders.update(v for v in labels.values() if v < n)
    starts = sorted(leaders)
    index = {s: b for b, s in enumerate(starts)}
    blocks = []
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else n
        last = instrs[e - 1]
        succ = []
        fall = index.get(e)
        t = _TARGET.search(last.text)
        if last.op in ("BRA", "JMP") and t and t.group(1) in labels:
            target = index[labels[t.group(1)]]
            if last.never:
                succ = [fall] if fall is not None else []
            else:
                succ = [target] + ([fall] if not last.always and fall is not None else [])
        elif last.op in ("EXIT", "RET", "BRX", "JMX"):
            succ = [] if last.always else ([fall] if fall is not None else [])
        elif fall is not None:
            succ = [fall]
        blocks.append(Block(s, e, succ))
    seen, stack = {0}, [0]
    while stack:
        for v in blocks[stack.pop()].succ:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    remap = {old: new for new, old in enumerate(sorted(seen))}
    return [Block(blocks[o].start, blocks[o].end, [remap[v] for v in blocks[o].succ]) for o in sorted(seen)]


def _dominators(blocks: list[Block]) -> list[set]:
    n = len(blocks)
    preds = [[] for _ in range(n)]
    for u, b in enumerate(blocks):
        for v in b.succ:
            preds[v].append(u)
    dom = [set(range(n)) for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in range(1, n):
            new = set.intersection(*(dom[p] for p in preds[v])) if preds[v] else set()
            new = new | {v}
            if new != dom[v]:
                dom[v], changed = new, True
    return dom


@dataclasses.dataclass
class Loop:
    header: int
    nodes: set
    latches: list
    parent: Optional[int] = None
    children: list = dataclasses.field(default_factory=list)


def find_loops(blocks: list[Block]) -> list[Loop]:
    """Natural loops (back edges u -> h with h dominating u), merged per header, with nesting."""
    dom = _dominators(blocks)
    preds = [[] for _ in blocks]
    for u, b in enumerate(blocks):
        for v in b.succ:
            preds[v].append(u)
    by_header: dict[int, Loop] = {}
    for u, b in enumerate(blocks):
        for h in b.succ:
            if h in dom[u]:
                body, stack = {h, u}, [u]
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                loop = by_header.setdefault(h, Loop(h, set(), []))
                loop.nodes |= body
                loop.latches.append(u)
    loops = sorted(by_header.values(), key=lambda lp: len(lp.nodes))
    for i, inner in enumerate(loops):
        for j in range(i + 1, len(loops)):
            if inner.nodes < loops[j].nodes:
                inner.parent = j
                loops[j].children.append(i)
                break
    return loops


def _shortest(blocks, weight, start, goal_edges_to, allowed, contracted):
    """Shortest node-weighted path from ``start`` to a node with an edge into ``goal_edges_to``,
    inside ``allowed``; each set in ``contracted`` counts as one node of weight 0 (a nested loop,
    whose iterations are counted on their own)."""
    group_of = {}
    for gi, group in enumerate(contracted):
        for v in group:
            group_of[v] = gi
    INF = float("inf")
    dist = {start: weight(start)}
    heap = [(dist[start], start)]
    best = INF
    while heap:
        d, u = heapq.heappop(heap)
        if d > dist.get(u, INF):
            continue
        members = contracted[group_of[u]] if u in group_of else (u,)
        for m in members:
            for v in blocks[m].succ:
                if goal_edges_to is not None and v == goal_edges_to:
                    best = min(best, d)
                    continue
                if v not in allowed or v in members:
                    continue
                rep = min(contracted[group_of[v]]) if v in group_of else v
                nd = d + (0 if v in group_of else weight(v))
                if nd < dist.get(rep, INF):
                    dist[rep] = nd
                    heapq.heappush(heap, (nd, rep))
        if goal_edges_to is None and not any(blocks[m].succ for m in members):
            best = min(best, d)
    return best


_WIDTH = (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1))


def _load_bytes(opcode: str) -> int:
    mods = opcode.split(".")[1:]
    for mod, width in _WIDTH:
        if mod in mods:
            return width
    return 4


_MMA_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA")


def _mma_flops(ins: Instr, num_warps: int) -> int:
    """FLOPs one CTA performs when every warp issues ``ins``: a wgmma (HGMMA MxNxK) runs once per
    warpgroup of 4 warps, an mma.sync (HMMA mnk, e.g. 16816) once per warp."""
    mods = ins.opcode.split(".")
    if ins.op in ("HGMMA", "QGMMA"):
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", mods[1]) if len(mods) > 1 else None
        if not m:
            return 0
        mm, nn, kk = (int(g) for g in m.groups())
        return 2 * mm * nn * kk * max(1, num_warps // 4)
    if ins.op in ("HMMA", "IMMA") and len(mods) > 1:
        shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32),
                 "8816": (8, 8, 16), "8832": (8, 8, 32)}.get(mods[1])
        return 2 * math.prod(shape) * num_warps if shape else 0
    return 0


@dataclasses.dataclass
class LoopCost:
    """One SASS loop: costs of one iteration for one warp (nested loops excluded)."""

    source: Optional[tuple]  # the source loop key ((file, line), ...), outermost first
    label: str
    depth: int
    innermost: bool
    instructions_min: int  # shortest path round the loop
    instructions_body: int
    barriers: int
    shuffles: int
    global_loads: int
    global_load_bytes: int  # per thread per iteration (LDG + LDGSTS)
    async_copies: int
    tensor_core: int
    mma_flops: int  # tensor-core FLOPs of one CTA-iteration
    shared_accesses: int
    global_stores: int

    def instructions_per_element(self, itemsize: int) -> Optional[float]:
        """Thread-instructions per streamed element of ``itemsize`` bytes."""
        if not self.global_load_bytes:
            return None
        return self.instructions_min * itemsize / self.global_load_bytes


@dataclasses.dataclass
class SassCost:
    instructions: int
    straight_min: int  # shortest entry -> exit path with every loop at zero iterations
    loops: list
    barriers: int
    shuffles: int
    local_accesses: int  # LDL/STL: local memory (spills or indexed arrays)
    straight_mma_flops: int  # tensor-core FLOPs outside loops (one CTA, every such instruction once)


def analyse_sass(text: str, source_loops: "SourceLoops", num_warps: int) -> SassCost:
    instrs, labels = parse_sass(text)
    blocks = build_cfg(instrs, labels)
    loops = find_loops(blocks)
    reachable = [i for b in blocks for i in range(b.start, b.end)]

    def weight(v):
        return blocks[v].end - blocks[v].start

    costs = []
    sources: list = []  # per loop (innermost first, as find_loops orders them)

    def descendants(loop):
        out = []
        for c in loop.children:
            out += [c] + descendants(loops[c])
        return out

    for li, loop in enumerate(loops):
        children = [loops[c].nodes for c in loop.children]
        nested = set().union(*children) if children else set()
        own = [i for v in sorted(loop.nodes - nested) for i in range(blocks[v].start, blocks[v].end)]
        n_min = _shortest(blocks, weight, loop.header, loop.header, loop.nodes, children)
        ops = [instrs[i] for i in own]
        # The source loop most of its own instructions come from, leaving out the loops its nested
        # SASS loops already stand for: an inner loop's prologue (first loads, software pipelining)
        # sits in the outer loop's body but belongs to the inner source loop.
        claimed = {sources[d] for d in descendants(loop) if sources[d] is not None}
        keys = collections.Counter(k for k in (source_loops.key_of(ins.chain) for ins in ops)
                                   if k is not None and k not in claimed)
        if keys:
            source = keys.most_common(1)[0][0]
        else:  # all of it from nested loops: the source loop around the first child's
            source = next((source_loops.parent(sources[c]) for c in loop.children if sources[c]), None)
        sources.append(source)
        depth, p = 0, loop.parent
        while p is not None:
            depth, p = depth + 1, loops[p].parent
        loads = [ins for ins in ops if ins.op in ("LDG", "LDGSTS")]
        label = source_loops.describe(source) if source else f"loop@{instrs[blocks[loop.header].start].addr:#x}"
        costs.append(LoopCost(
            source=source, label=label,
            depth=depth, innermost=not loop.children, instructions_min=int(n_min), instructions_body=len(own),
            barriers=sum(ins.op == "BAR" for ins in ops), shuffles=sum(ins.op == "SHFL" for ins in ops),
            global_loads=len(loads), global_load_bytes=sum(_load_bytes(ins.opcode) for ins in loads),
            async_copies=sum(ins.op in ("LDGSTS", "UTMALDG", "UBLKCP") for ins in ops),
            tensor_core=sum(ins.op in _MMA_OPS for ins in ops),
            mma_flops=sum(_mma_flops(ins, num_warps) for ins in ops if ins.op in _MMA_OPS),
            shared_accesses=sum(ins.op in ("LDS", "STS", "LDSM", "STSM") for ins in ops),
            global_stores=sum(ins.op in ("STG", "RED", "ATOMG") for ins in ops)))
    top = [lp.nodes for lp in loops if lp.parent is None]
    straight = _shortest(blocks, weight, 0, None, set(range(len(blocks))), top)
    ops = [instrs[i] for i in reachable]
    in_loops = set().union(*top) if top else set()
    outside = [instrs[i] for v in range(len(blocks)) if v not in in_loops
               for i in range(blocks[v].start, blocks[v].end)]
    return SassCost(len(reachable), int(straight) if straight != float("inf") else 0, costs,
                    sum(i.op == "BAR" for i in ops), sum(i.op == "SHFL" for i in ops),
                    sum(i.op in ("LDL", "STL") for i in ops),
                    sum(_mma_flops(i, num_warps) for i in outside if i.op in _MMA_OPS))


class SourceLoops:
    """The ``for`` / ``while`` loops of the kernel sources (``tl.static_range`` loops are unrolled
    and are not loops of the compiled code)."""

    def __init__(self, files):
        self.loops = {}  # file -> [(header, body_first, end)]
        for path in files:
            with open(path) as f:
                tree = ast.parse(f.read())
            found = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.For, ast.While)):
                    if isinstance(node, ast.For) and isinstance(node.iter, ast.Call):
                        fn = node.iter.func
                        if (getattr(fn, "attr", None) or getattr(fn, "id", None)) == "static_range":
                            continue
                    found.append((node.lineno, node.body[0].lineno, node.end_lineno))
            self.loops[path] = sorted(found)
        self.headers = {path: {h: (b, e) for h, b, e in loops} for path, loops in self.loops.items()}

    def innermost(self, path, line):
        best = None
        for h, b, e in self.loops.get(path, ()):
            if h <= line <= e and (best is None or h > best[0]):
                best = (h, b, e)
        return best

    def key_of(self, chain):
        """The source loop an instruction belongs to: (call sites outermost first..., (file, header))."""
        chain = [c for c in chain if c[0] in self.loops]
        for level, (path, line) in enumerate(chain):
            loop = self.innermost(path, line)
            if loop is not None:
                return tuple(reversed(chain[level + 1:])) + ((path, loop[0]),)
        return None

    def parent(self, key):
        """The source loop around the loop ``key`` (in its own function, else around the call)."""
        for level in range(len(key) - 1, -1, -1):
            path, line = key[level]
            best = None
            for h, b, e in self.loops.get(path, ()):
                inside = h < line <= e if level == len(key) - 1 else h <= line <= e
                if inside and (best is None or h > best):
                    best = h
            if best is not None:
                return key[:level] + ((path, best),)
        return None

    @staticmethod
    def describe(key) -> str:
        parts = [f"{os.path.basename(p)}:{line}" for p, line in key]
        return parts[-1] + (f" (via {' > '.join(parts[:-1])})" if len(parts) > 1 else "")


def serialise_key(key) -> str:
    return " > ".join(f"{p}:{line}" for p, line in key)


# ---------------------------------------------------------------------------------------------
# Occupancy and bounds
# ---------------------------------------------------------------------------------------------


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    regs_per_warp = -(-max(registers, 1) * 32 // SM90["reg_alloc_unit_per_warp"]) * SM90["reg_alloc_unit_per_warp"]
    by_regs = (SM90["regs_per_sm"] // regs_per_warp) // num_warps
    by_warps = SM90["max_warps_per_sm"] // num_warps
    by_smem = SM90["smem_per_sm"] // (shared + SM90["smem_reserved_per_cta"])
    return max(0, min(by_regs, by_warps, by_smem, SM90["max_ctas_per_sm"]))


def issue_slots_per_cycle(machine: Machine, ctas: int, num_warps: int, resident: int) -> tuple[int, int]:
    """(SMs in use, warp-instructions issued per cycle across them) when ``ctas`` CTAs work."""
    if ctas <= 0:
        return 0, 0
    sms = min(machine.sms, ctas)
    warps_per_sm = num_warps * min(max(resident, 1), -(-ctas // machine.sms))
    return sms, sms * min(machine.schedulers_per_sm, warps_per_sm)


def loop_bandwidth_fraction(machine: Machine, loop: LoopCost, ctas: int, num_warps: int, resident: int) -> float:
    """Upper bound of the HBM fraction the loop can stream at when ``ctas`` CTAs run it."""
    if not loop.global_load_bytes or not loop.instructions_min:
        return 0.0
    _, slots = issue_slots_per_cycle(machine, ctas, num_warps, resident)
    bytes_per_s = slots * machine.clock_hz * 32 * loop.global_load_bytes / loop.instructions_min
    return min(1.0, bytes_per_s / machine.hbm_bytes_per_s)


# ---------------------------------------------------------------------------------------------
# Trip counts: the trace worker
# ---------------------------------------------------------------------------------------------


class _LoopCounter:
    """Counts iterations of every source loop, keyed by its call path, inside the traced program.

    The interpreter runs each jit function from its rewritten AST (``FunctionRewriter``);
    ``instrument_interpreter`` adds a call ``__kernel_cost_tick__(header_line)`` as the first
    statement of every ``for`` / ``while`` body (not ``static_range``, which compiles to no loop),
    so a count costs one call per iteration, not a tracer call per line.
    """

    def __init__(self, source_loops: SourceLoops):
        self.src = source_loops
        self.root_code = None  # the kernel's code object while a selected program runs
        self.counts = collections.Counter()

    def tick(self, header: int) -> None:
        if self.root_code is None:
            return
        frame = sys._getframe(1)
        parts = [(frame.f_code.co_filename, header)]
        while frame.f_code is not self.root_code:
            frame = frame.f_back
            if frame is None:
                break
            if frame.f_code.co_filename in self.src.headers:
                parts.append((frame.f_code.co_filename, frame.f_lineno))
        self.counts[serialise_key(tuple(reversed(parts)))] += 1


_TICK = "__kernel_cost_tick__"


class _TickInserter(ast.NodeTransformer):
    def visit_For(self, node):
        self.generic_visit(node)
        fn = node.iter.func if isinstance(node.iter, ast.Call) else None
        if fn is not None and (getattr(fn, "attr", None) or getattr(fn, "id", None)) == "static_range":
            return node
        return self._tick(node)

    def visit_While(self, node):
        self.generic_visit(node)
        return self._tick(node)

    @staticmethod
    def _tick(node):
        call = ast.Expr(ast.Call(ast.Name(_TICK, ast.Load()), [ast.Constant(node.lineno)], []))
        ast.copy_location(call, node.body[0])
        ast.copy_location(call.value, node.body[0])
        ast.copy_location(call.value.func, node.body[0])
        ast.copy_location(call.value.args[0], node.body[0])
        node.body.insert(0, call)
        return node


def instrument_interpreter(counter: _LoopCounter) -> None:
    """Make the interpreter's rewritten kernels tick ``counter`` once per loop iteration."""
    from triton.runtime import interpreter

    rewriter = interpreter.FunctionRewriter
    if getattr(rewriter, "_kernel_cost_original", None) is None:
        original = rewriter._transform_ast

        def transform(self, src):
            return ast.fix_missing_locations(_TickInserter().visit(original(self, src)))

        rewriter._kernel_cost_original = original
        rewriter._transform_ast = transform
    interpreter.InterpretedFunction.rewritten_fn.clear()
    import ddiff.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        setattr(importlib.import_module(f"{pkg.__name__}.{info.name}"), _TICK, counter.tick)


def _run_traced(launch: Launch, policy: TracePolicy, counter: _LoopCounter, out: list):
    """Interpret ``launch`` (TRITON_INTERPRET=1), counting loop trips of the programs the policy selects."""
    import torch
    from triton.runtime.interpreter import GridExecutor, interpreter_builder

    fn = launch.kernel
    real = fn.rewrite()
    real.__globals__.setdefault(_TICK, counter.tick)
    grid = launch.grid
    per_program = {}
    builder, fresh = interpreter_builder, collections.Counter

    def program(**kwargs):
        pid = tuple(builder.grid_idx)
        if not policy.select(pid, grid):
            return None
        counter.root_code, counter.counts = real.__code__, fresh()
        try:
            real(**kwargs)
        finally:
            counter.root_code = None
        per_program[pid] = dict(counter.counts)
        return None

    # The interpreter patches triton.language in the globals of the function it runs: give the
    # wrapper the kernel module's globals (it reads nothing global itself).
    program = types.FunctionType(program.__code__, real.__globals__, real.__name__, None, program.__closure__)
    program.__signature__ = inspect.signature(real)
    program.__annotations__ = dict(getattr(real, "__annotations__", {}))
    args = tuple(a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in launch.args)
    with torch._C.DisableTorchFunction(), warnings.catch_warnings(), _numpy_quiet():
        warnings.simplefilter("ignore")
        GridExecutor(program, fn.arg_names, grid, fn.pre_run_hooks)(*args, **launch.kwargs)
    out.append({"kernel": kernel_key(fn), "grid": list(grid),
                "programs": {",".join(map(str, pid)): counts for pid, counts in per_program.items()}})


@contextlib.contextmanager
def _numpy_quiet():
    import numpy as np

    old = np.seterr(all="ignore")
    try:
        yield
    finally:
        np.seterr(**old)


def trace_worker(case_names: list[str], quick: bool, out_path: str) -> None:
    """Entry of the ``--trace-worker`` subprocess: trip counts per launch of the named cases."""
    import torch

    counter = _LoopCounter(SourceLoops(_kernel_files()))
    instrument_interpreter(counter)
    results = {}
    for case in all_cases(quick):
        if case.name not in case_names:  # the parent passes exact names
            continue
        traced: list = []
        start = time.perf_counter()
        torch.manual_seed(0)
        with pretend_cuda(on_launch=lambda launch: _run_traced(launch, case.trace, counter, traced)):
            case.run()
        results[case.name] = {"launches": traced, "seconds": time.perf_counter() - start}
        print(f"  traced {case.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f)


def _kernel_files() -> list[str]:
    import ddiff.kernels as pkg

    files = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        files.append(os.path.abspath(mod.__file__))
    return files


def run_trace_worker(root: str, cases: list[Case], quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "benchmarks.kernel_cost", "--trace-worker", out, "--source", root]
        if quick:
            cmd.append("--quick")
        cmd += [f"--case={c.name}" for c in cases]
        subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


def _variant_row(comp: Compiled, sass: Optional[SassCost]) -> dict:
    spec = comp.spec
    row = {"kernel": spec.kernel, "key": spec.key, "constexprs": spec.constexpr_summary(),
           "signature": {k: v for k, v in spec.signature.items() if v != "constexpr"},
           "divisible_by_16": sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                     for k, v in spec.attrs.items() if v),
           "num_warps": spec.num_warps, "num_stages": spec.num_stages, "compile_seconds": round(comp.seconds, 2)}
    if comp.error:
        row["error"] = comp.error
        return row
    res = parse_ptxas(comp.ptxas_log)
    row.update(res)
    row["shared_bytes"] = comp.shared
    row["ctas_per_sm"] = ctas_per_sm(res["registers"], spec.num_warps, comp.shared)
    row["sass_instructions"] = sass.instructions
    row["straight_line_min"] = sass.straight_min
    row["local_memory_instructions"] = sass.local_accesses
    row["straight_line_mma_flops"] = sass.straight_mma_flops
    row["loops"] = [dataclasses.asdict(lp) | {"source": serialise_key(lp.source) if lp.source else None}
                    for lp in sass.loops]
    return row


def _program_costs(launch_trace: dict, grid: tuple, policy: TracePolicy, loops: list) -> tuple[list, dict]:
    """Per program (estimated via the policy's representative): per-warp instruction count and
    the trips of each loop summed over all programs."""
    traced = {tuple(int(x) for x in k.split(",")): v for k, v in launch_trace["programs"].items()}
    by_key = collections.defaultdict(list)
    for i, lp in enumerate(loops):
        if lp["source"]:
            by_key[lp["source"]].append(i)
    # A source loop that ptxas split into versions is charged at its cheapest copy.
    charged = {key: min(idx, key=lambda i: loops[i]["instructions_min"]) for key, idx in by_key.items()}
    per_program = {}
    for pid, counts in traced.items():
        cost = flops = 0
        for key, trips in counts.items():
            if key in charged:
                cost += trips * loops[charged[key]]["instructions_min"]
                flops += trips * loops[charged[key]]["mma_flops"]
        per_program[pid] = (cost, flops)
    totals = collections.Counter()
    working_ctas = 0
    warp_instr = []  # per program: (loop warp-instructions per warp, loop tensor-core FLOPs)
    # A CTA does work when it runs an iteration of any compiled loop (a masked row that exits at
    # once does not); in a kernel without loops every CTA does.
    loop_keys = set(charged)
    for x in range(grid[0]):
        for y in range(grid[1]):
            for z in range(grid[2]):
                rep = policy.rep((x, y, z), grid)
                counts = traced.get(rep)
                if counts is None:
                    continue
                for key, trips in counts.items():
                    totals[key] += trips
                if not loop_keys or any(counts.get(k) for k in loop_keys):
                    working_ctas += 1
                warp_instr.append(per_program[rep])
    return warp_instr, {"loop_trips": dict(totals), "working_ctas": working_ctas,
                        "traced_programs": len(traced), "charged": charged}


def launch_bounds(machine: Machine, variant: dict, grid: tuple, program_costs: list, working_ctas: int) -> dict:
    """Lower bounds of one launch's time (seconds): issue slots, the longest program's critical
    path, and the tensor-core FLOPs at the dense bf16 rate of the SMs in use."""
    warps = variant["num_warps"]
    straight = variant["straight_line_min"]
    per_warp = [straight + instr for instr, _ in program_costs]
    total = sum(per_warp) * warps
    ctas = working_ctas or len(per_warp)
    sms, slots = issue_slots_per_cycle(machine, ctas, warps, variant["ctas_per_sm"])
    t_issue = total / (slots * machine.clock_hz) if slots else 0.0
    t_crit = max(per_warp, default=0) * max(1.0, warps / machine.schedulers_per_sm) / machine.clock_hz
    flops = sum(f for _, f in program_costs) + working_ctas * variant["straight_line_mma_flops"]
    t_mma = flops / (machine.tensor_flops_per_s * sms / machine.sms) if sms else 0.0
    return {"issue_s": t_issue, "critical_s": t_crit, "tensor_core_s": t_mma, "tensor_core_flops": flops,
            "bound_s": max(t_issue, t_crit, t_mma)}


_POOL_STATE: dict = {}


def _pool_init(root: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    use_source(root)
    _POOL_STATE["kernels"] = {kernel_key(k): k for k in discover_kernels().values()}
    _POOL_STATE["loops"] = SourceLoops(_kernel_files())


def _compile_job(kernel: str, args: tuple, kwargs: dict) -> dict:
    """Specialise, compile and analyse one launch (in a pool process)."""
    spec = specialise(Launch(_POOL_STATE["kernels"][kernel], (1, 1, 1), args, kwargs))
    comp = compile_spec(spec)
    sass = None if comp.error else analyse_sass(comp.sass, _POOL_STATE["loops"], spec.num_warps)
    return _variant_row(comp, sass)


def evaluate(cases: list[Case], root: str, *, trace: bool, quick: bool, jobs: int = 1, log=print) -> dict:
    import concurrent.futures
    import multiprocessing

    kernels = discover_kernels()
    variants: dict[str, dict] = {}
    pending = {}
    case_rows = []
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_pool_init,
                                                initargs=(root,)) as pool:
        for case in cases:
            launches, info = capture(case)
            specs = [specialise(launch) for launch in launches]
            for launch, spec in zip(launches, specs):
                if spec.key not in pending:
                    pending[spec.key] = pool.submit(_compile_job, launch.name, launch.args, launch.kwargs)
            case_rows.append({"name": case.name, "group": case.group, "source": case.source, "info": info,
                              "stream_itemsize": case.stream_itemsize,
                              "trace_policy": case.trace.describe if case.trace else None,
                              "launches": [{"kernel": launch.name, "grid": list(launch.grid), "variant": spec.key}
                                           for launch, spec in zip(launches, specs)]})
        log(f"  captured {len(cases)} cases: {len(pending)} distinct compiled variants")
        for key, future in pending.items():
            variants[key] = future.result()
            if variants[key]["key"] != key:
                raise RuntimeError(f"{key}: the pool process specialised the launch differently")
            variants[key]["id"] = f"v{len(variants)}"
    log(f"  compiled in {time.perf_counter() - start:.1f} s")
    traces = {}
    if trace:
        log("tracing trip counts under the interpreter ...")
        traces = run_trace_worker(root, [c for c in cases if c.trace is not None], quick)
    for case, row in zip(cases, case_rows):
        _bound_case(case, row, variants, traces.get(row["name"]))
    costed = {launch["kernel"] for row in case_rows for launch in row["launches"]}
    return {"kernels": sorted(kernels), "uncosted_kernels": sorted(set(kernels) - costed),
            "variants": list(variants.values()), "cases": case_rows}


def _bound_case(case: Case, row: dict, variants: dict, trace: Optional[dict]) -> None:
    per_machine = {m.name: 0.0 for m in MACHINES}
    traced_launches = trace["launches"] if trace else None
    if traced_launches is not None and len(traced_launches) != len(row["launches"]):
        raise RuntimeError(f"{case.name}: the trace saw {len(traced_launches)} launches, the capture "
                           f"{len(row['launches'])}")
    for i, launch in enumerate(row["launches"]):
        v = variants[launch["variant"]]
        launch["variant_id"] = v["id"]
        if "error" in v:
            continue
        grid = tuple(launch["grid"])
        loops = v["loops"]
        launch["ctas"] = math.prod(grid)
        stream_loops = [lp for lp in loops if lp["global_load_bytes"]]
        if traced_launches is not None:
            tl_ = traced_launches[i]
            if tl_["kernel"] != launch["kernel"] or tuple(tl_["grid"]) != grid:
                raise RuntimeError(f"{case.name}: launch {i} differs between capture and trace")
            warp_instr, stats = _program_costs(tl_, grid, case.trace, loops)
            launch["working_ctas"] = stats["working_ctas"]
            launch["traced_programs"] = stats["traced_programs"]
            launch["loop_trips"] = stats["loop_trips"]
            launch["bounds"] = {}
            for m in MACHINES:
                b = launch_bounds(m, v, grid, warp_instr, stats["working_ctas"])
                launch["bounds"][m.name] = b
                per_machine[m.name] += b["bound_s"]
            hot = max((lp for lp in stream_loops), default=None,
                      key=lambda lp: stats["loop_trips"].get(lp["source"], 0) * lp["global_load_bytes"])
        else:
            hot = max(stream_loops, default=None,
                      key=lambda lp: (lp["innermost"], lp["global_load_bytes"] / max(lp["instructions_min"], 1)))
        working = launch.get("working_ctas", launch["ctas"])
        if hot is not None:
            launch["hot_loop"] = hot["label"]
            launch["hot_loop_instructions"] = hot["instructions_min"]
            if case.stream_itemsize:
                launch["hot_loop_instructions_per_element"] = round(
                    hot["instructions_min"] * case.stream_itemsize / hot["global_load_bytes"], 2)
            launch["hot_loop_bw_fraction"] = {
                m.name: round(loop_bandwidth_fraction(m, LoopCost(**{k: hot[k] for k in LoopCost.__dataclass_fields__
                                                                     if k in hot}), working, v["num_warps"],
                                                      v["ctas_per_sm"]), 3) for m in MACHINES}
    if traced_launches is not None:
        row["trace_seconds"] = round(trace["seconds"], 1)
        row["bounds"] = {}
        for m in MACHINES:
            t_launches = per_machine[m.name]
            t_hbm = row["info"]["bytes"] / m.hbm_bytes_per_s
            t = max(t_launches, t_hbm)
            row["bounds"][m.name] = {"time_s": t, "issue_time_s": t_launches, "hbm_time_s": t_hbm,
                                     "hbm_fraction": (t_hbm / t) if t else None}
        if "live_pairs" in row["info"]:
            row["tiles"] = _attention_tiles(row, variants)


def _attention_tiles(row: dict, variants: dict) -> dict:
    """Computed vs live tiles per attention kernel, from the tensor-core work.

    computed = the tensor-core FLOPs the kernel runs (per loop: trips x the FLOPs of its MMA
    instructions, plus those outside loops once per working CTA), in units of one BLOCK_M x BLOCK_N
    tile of the kernel's products; live = live (query, key) pairs / (BLOCK_M x BLOCK_N): what a
    perfectly packed tiling computes. Kernels without tensor-core instructions (fp32) are skipped.
    """
    out = {}
    info = row["info"]
    for launch in row["launches"]:
        v = variants[launch["variant"]]
        products = info["products"].get(launch["kernel"].split(":")[1])
        if "loop_trips" not in launch or "error" in v or not products:
            continue
        bm, bn = v["constexprs"].get("BLOCK_M"), v["constexprs"].get("BLOCK_N")
        flops = sum(launch["loop_trips"].get(lp["source"], 0) * lp["mma_flops"] for lp in v["loops"] if lp["source"])
        flops += launch["working_ctas"] * v["straight_line_mma_flops"]
        if not flops:
            continue
        per_tile = products * 2 * info["head_dim"] * bm * bn
        live = info["live_pairs"] / (bm * bn)
        out[launch["kernel"]] = {"computed_tiles": round(flops / per_tile, 1), "live_tiles": round(live, 1),
                                 "ratio": round(flops / per_tile / live, 3), "tile": [bm, bn],
                                 "products_per_tile": products}
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def static_bounds(case_name: str, machine: str, path: Optional[str] = None) -> Optional[dict]:
    """The static time bounds (seconds) of a costed case from a results file: ``{"total": ...,
    kernel: summed launch bounds}``; None when the file or the case (or its trace) is missing.
    Benchmarks print them next to what they measure."""
    path = path or os.path.join(RESULTS_DIR, "kernel-cost-sm90.json")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    case = next((c for c in result.get("cases", ()) if c["name"] == case_name), None)
    if case is None or "bounds" not in case or machine not in case["bounds"]:
        return None
    out = {"total": case["bounds"][machine]["time_s"]}
    for launch in case["launches"]:
        bound = launch.get("bounds", {}).get(machine, {}).get("bound_s")
        if bound is not None:
            out[launch["kernel"]] = out.get(launch["kernel"], 0.0) + bound
    return out


def _targets(result: dict) -> list[dict]:
    cases = {c["name"]: c for c in result["cases"]}
    out = []

    def add(name, case_name, metric, value, goal, ok):
        out.append({"target": name, "case": case_name, "metric": metric, "value": value, "goal": goal,
                    "met": ok})

    c = cases.get(TARGET_SAMPLE)
    if c and "bounds" in c:
        frac = c["bounds"]["H200"]["hbm_fraction"]
        add("unfiltered sample >= 80% of H200 HBM", c["name"], "static bound of the HBM fraction (H200)",
            round(frac, 3), ">= 0.80", frac >= 0.8)
    for name, goal in zip(TARGET_FILTERED, (0.15e-3, 0.08e-3)):
        c = cases.get(name)
        if c and "bounds" in c:
            t = c["bounds"]["H100 SXM"]["time_s"]
            add(f"filtered sample <= {goal * 1e3:.2f} ms on an H100", name, "static time bound (H100), ms",
                round(t * 1e3, 4), f"<= {goal * 1e3:.2f}", t <= goal)
    c = cases.get(TARGET_DLLM)
    if c and "bounds" in c:
        working = max((lp.get("working_ctas", 0) for lp in c["launches"]), default=0)
        add("dLLM step: >= 100 CTAs doing work", c["name"], "most CTAs doing work in one launch", working, ">= 100",
            working >= 100)
        t = c["bounds"]["H100 SXM"]["time_s"]
        add("dLLM step <= 10 us", c["name"], "static time bound (H100), us", round(t * 1e6, 2), "<= 10", t <= 10e-6)
    spills = [v for v in result["variants"] if v["kernel"].startswith("anchor_attention:")
              and (v.get("spill_store_bytes") or v.get("spill_load_bytes"))]
    att = [v for v in result["variants"] if v["kernel"].startswith("anchor_attention:")]
    if att:
        add("anchor attention: 0 spill bytes", "every anchor-attention variant", "variants that spill",
            len(spills), "0", not spills)
    c = cases.get(TARGET_ATTENTION)
    if c and c.get("tiles"):
        worst = max(t["ratio"] for t in c["tiles"].values())
        add("anchor attention: computed <= 1.1 x live tiles", c["name"], "worst computed/live over the kernels",
            worst, "<= 1.1", worst <= 1.1)
    return out


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def machine_model() -> dict:
    return {"machines": [dataclasses.asdict(m) | {"thread_instructions_per_bf16_at_full_bw":
                                                   round(m.thread_instructions_per_bf16(), 1)} for m in MACHINES],
            "sm90_limits": SM90,
            "bound": ("time >= max(sum over launches of max(issue, critical path, tensor-core FLOPs / dense "
                      "bf16 rate of the SMs in use), compulsory bytes / HBM); "
                      "issue = sum of warp-instructions (shortest path per loop iteration x traced trips + "
                      "shortest straight-line path) / (schedulers in use x clock); critical path = the longest "
                      "program's per-warp instructions x max(1, warps / 4) / clock. Perfect latency hiding, no "
                      "launch gaps: a real GPU can only be slower.")}


def to_markdown(result: dict) -> str:
    lines = [f"# Static kernel cost on sm_90 ({result['title']})", ""]
    lines += [f"Source: `{result['source']}` at {result['commit']}; triton {result['triton']}, ptxas "
              f"{result['ptxas']}; generated by `{result['command']}` on a machine without a GPU "
              f"({result['generated']}). No number here was measured on a GPU.", ""]
    lines += ["## Machine model", ""]
    for m in result["machine_model"]["machines"]:
        lines.append(f"- {m['name']}: {m['sms']} SMs x {m['schedulers_per_sm']} schedulers, one warp-instruction "
                     f"per scheduler per cycle at {m['clock_hz'] / 1e9:.2f} GHz; HBM {m['hbm_bytes_per_s'] / 1e12:.2f} "
                     f"TB/s -> {m['thread_instructions_per_bf16_at_full_bw']} thread-instructions per bf16 element "
                     f"at full bandwidth; dense bf16 tensor cores {m['tensor_flops_per_s'] / 1e12:.0f} TFLOP/s.")
    lim = result["machine_model"]["sm90_limits"]
    lines.append(f"- Per SM: {lim['regs_per_sm']} registers, {lim['max_warps_per_sm']} warps, "
                 f"{lim['max_ctas_per_sm']} CTAs, {lim['smem_per_sm'] // 1024} KB shared memory "
                 f"({lim['smem_reserved_per_cta']} B reserved per CTA).")
    lines.append(f"- Bound: {result['machine_model']['bound']}")
    lines += ["", "## Targets (issue 10)", ""]
    if result["targets"]:
        lines += ["| target | case | metric | static value | goal | met |", "| --- | --- | --- | --- | --- | --- |"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['case']} | {t['metric']} | {_fmt(t['value'], 4)} | {t['goal']} | "
                         f"{'yes' if t['met'] else 'NO'} |")
    else:
        lines.append("Not evaluated (quick mode traces no trip counts).")
    if result["uncosted_kernels"]:
        lines += ["", f"**Kernels no case launched:** {', '.join(result['uncosted_kernels'])}"]
    lines += ["", "## Cases", "",
              "Per launch: grid (CTAs), CTAs doing work (traced), the hot loop (the one streaming the most bytes) "
              "with its warp-instructions per iteration (shortest path), thread-instructions per streamed element, "
              "the HBM fraction its issue rate allows with the working CTAs, and the launch's time bound.", ""]
    lines += ["| case | kernel | variant | grid | working CTAs | hot loop | instr/iter | instr/elem | "
              "loop BW bound H100 / H200 | launch bound H100 (us) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["cases"]:
        for launch in c["launches"]:
            bw = launch.get("hot_loop_bw_fraction")
            bound = launch.get("bounds", {}).get("H100 SXM", {}).get("bound_s")
            lines.append(f"| {c['name']} | {launch['kernel']} | {launch.get('variant_id', '-')} | "
                         f"{'x'.join(map(str, launch['grid']))} | {_fmt(launch.get('working_ctas'))} | "
                         f"{launch.get('hot_loop', '-')} | {_fmt(launch.get('hot_loop_instructions'))} | "
                         f"{_fmt(launch.get('hot_loop_instructions_per_element'))} | "
                         f"{'-' if not bw else f'{bw[MACHINES[0].name]:.2f} / {bw[MACHINES[1].name]:.2f}'} | "
                         f"{'-' if bound is None else f'{bound * 1e6:.2f}'} |")
    traced = [c for c in result["cases"] if "bounds" in c]
    if traced:
        lines += ["", "### Case bounds", "",
                  "| case | compulsory MB | H100 time bound (us) | H100 HBM fraction | H200 time bound (us) | "
                  "H200 HBM fraction | trip counts traced over |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in traced:
            h1, h2 = c["bounds"]["H100 SXM"], c["bounds"]["H200"]
            lines.append(f"| {c['name']} | {c['info']['bytes'] / 1e6:.3g} | {h1['time_s'] * 1e6:.3g} | "
                         f"{h1['hbm_fraction']:.2f} | {h2['time_s'] * 1e6:.3g} | {h2['hbm_fraction']:.2f} | "
                         f"{c['trace_policy']} |")
        att = [c for c in traced if c.get("tiles")]
        if att:
            lines += ["", "### Anchor attention: computed vs live tiles", "",
                      "live = live (query, key) pairs / tile area, summed over heads (a perfectly packed tiling).", "",
                      "| case | kernel | tile | computed tiles | live tiles | computed / live |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for c in att:
                for k, t in c["tiles"].items():
                    lines.append(f"| {c['name']} | {k} | {t['tile'][0]}x{t['tile'][1]} | {t['computed_tiles']} | "
                                 f"{t['live_tiles']} | {t['ratio']} |")
    lines += ["", "## Compiled variants", "",
              "Registers, spills (ptxas), shared memory, warps, resident CTAs per SM; per loop (innermost marked *): "
              "warp-instructions on the shortest path / in the body, barriers, shuffles, global loads (bytes per "
              "thread), tensor-core instructions, per iteration.", "",
              "| id | kernel | constexprs | warps | regs | spill st/ld B | smem B | CTAs/SM | loops |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in result["variants"]:
        consts = ", ".join(f"{k}={val}" for k, val in v["constexprs"].items())
        if "error" in v:
            lines.append(f"| {v['id']} | {v['kernel']} | {consts} | {v['num_warps']} | COMPILE ERROR | | | | "
                         f"{v['error'].splitlines()[0][:120]} |")
            continue
        loops = "<br>".join(
            f"{'*' if lp['innermost'] else ''}{lp['label']}: {lp['instructions_min']}/{lp['instructions_body']} instr, "
            f"{lp['barriers']} BAR, {lp['shuffles']} SHFL, {lp['global_loads']} LDG ({lp['global_load_bytes']} B)"
            + (f", {lp['tensor_core']} MMA" if lp["tensor_core"] else "") for lp in v["loops"]) or "-"
        lines.append(f"| {v['id']} | {v['kernel']} | {consts} | {v['num_warps']} | {v['registers']} | "
                     f"{v['spill_store_bytes']}/{v['spill_load_bytes']} | {v['shared_bytes']} | {v['ctas_per_sm']} | "
                     f"{loops} |")
    return "\n".join(lines) + "\n"


def problems(result: dict) -> list[str]:
    """What the check rejects: compile errors, ptxas spills, kernels no case launched."""
    out = []
    for v in result["variants"]:
        consts = ", ".join(f"{k}={val}" for k, val in v["constexprs"].items())
        if "error" in v:
            out.append(f"{v['kernel']} ({consts}) does not compile for sm_90: {v['error'][:2000]}")
        elif v["spill_store_bytes"] or v["spill_load_bytes"]:
            out.append(f"{v['kernel']} ({consts}, {v['num_warps']} warps) spills: {v['spill_store_bytes']} B "
                       f"stores / {v['spill_load_bytes']} B loads at {v['registers']} registers")
    for k in result["uncosted_kernels"]:
        out.append(f"kernel {k} is launched by no case of benchmarks/kernel_cost.py")
    return out


def _ptxas_version() -> str:
    try:
        out = subprocess.run([_tool_path("ptxas"), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return m.group(2) if m else out.strip().splitlines()[-1]
    except (OSError, AttributeError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="coverage cases only, no trip counts; checks")
    parser.add_argument("--source", default=None, help="checkout whose ddiff/ and kernels/ to cost")
    parser.add_argument("--out", default=None, help="output path without extension "
                                                    "(default benchmarks/results/kernel-cost-sm90[-quick])")
    parser.add_argument("--case", action="append", default=[], help="only cases whose name contains this")
    parser.add_argument("--no-trace", action="store_true", help="skip the interpreter trip counts")
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, a spill or an "
                                                             "uncosted kernel (implied by --quick)")
    parser.add_argument("--title", default="current tree")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: CPUs, at most 4)")
    parser.add_argument("--trace-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trace_worker:
        use_source(args.source)
        trace_worker(args.case, args.quick, args.trace_worker)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels are compiled here, not interpreted
    root = use_source(args.source)
    import triton

    # triton 3.9 warns that its default (fusion on, what the JIT compiles with) will change.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    cases = [c for c in all_cases(args.quick) if not args.case or any(s in c.name for s in args.case)]
    start = time.perf_counter()
    print(f"kernel_cost: {len(cases)} cases from {root}")
    result = evaluate(cases, root, trace=not (args.quick or args.no_trace), quick=args.quick,
                      jobs=args.jobs or max(1, min(4, len(os.sched_getaffinity(0)))))
    result.update(title=args.title, source=root, commit=_git_describe(root), triton=triton.__version__,
                  ptxas=_ptxas_version(), machine_model=machine_model(),
                  command="python -m benchmarks.kernel_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
                  generated=time.strftime("%Y-%m-%d"), seconds=round(time.perf_counter() - start, 1))
    result["targets"] = _targets(result)
    out = args.out or os.path.join(RESULTS_DIR, "kernel-cost-sm90" + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(out + ".md", "w") as f:
        f.write(to_markdown(result))
    for t in result["targets"]:
        print(f"  target {t['target']}: {_fmt(t['value'], 4)} (goal {t['goal']}) -> {'met' if t['met'] else 'NOT met'}")
    found = problems(result)
    for p in found:
        print("PROBLEM:", p)
    print(f"wrote {out}.json / .md ({len(result['variants'])} compiled variants, {result['seconds']} s)")
    return 1 if found and (args.check or args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
