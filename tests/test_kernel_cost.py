"""benchmarks/kernel_cost.py: the static sm_90 cost tool, and the compile check it runs in CI.

``test_quick_mode`` runs ``python -m benchmarks.kernel_cost --quick`` in a subprocess without
TRITON_INTERPRET: every kernel configuration is specialised as the JIT would and compiled for
sm_90 with triton's ptxas; the run fails on a compile error, on a ptxas spill, or on a kernel of
``ddiff.kernels`` that no case launches. The other tests check the tool's parts on inputs whose
answer is known by hand (SASS snippets, a probe kernel under the interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import kernel_cost as kc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_cost") / "quick"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_cost", "--quick", "--out", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1500)
    report = json.loads((out.parent / "quick.json").read_text()) if (out.parent / "quick.json").exists() else None
    return result, report


def test_quick_mode(quick):
    result, report = quick
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert report is not None and not kc.problems(report)
    assert report["kernels"] and not report["uncosted_kernels"]
    for v in report["variants"]:
        assert "error" not in v, v
        assert v["spill_store_bytes"] == 0 and v["spill_load_bytes"] == 0, v
        assert v["registers"] > 0 and v["sass_instructions"] > 0


def test_quick_mode_keeps_the_compile_check_coverage(quick):
    _, report = quick
    variants = report["variants"]
    cases = {c["name"] for c in report["cases"]}
    # Every confidence kind and every logits dtype once, filtered and unfiltered.
    for kind in ("prob", "margin", "neg_entropy", "random"):
        assert any(f"predict_tokens {kind}/" in c for c in cases), kind
    assert any("top_k50+top_p0.9" in c for c in cases) and any("mask+suppress" in c for c in cases)
    sampling = [v for v in variants if v["kernel"].startswith("sampling:")]
    pointer_types = {t for v in sampling for t in v["signature"].values()}
    assert {"*bf16", "*fp16", "*fp32"} <= pointer_types
    # Each anchor-attention kernel at D=64 and D=128 in bf16 (tensor cores), and at D=64 in fp32
    # (exact products; D=128 in the full run).
    for kernel in ("_anchor_attn_fwd", "_anchor_attn_bwd_preprocess", "_anchor_attn_bwd_dkdv", "_anchor_attn_bwd_dq"):
        seen = {(v["constexprs"]["HEAD_DIM"], next(t for t in v["signature"].values() if t.startswith("*")))
                for v in variants if v["kernel"] == f"anchor_attention:{kernel}"}
        assert seen == {(64, "*bf16"), (128, "*bf16"), (64, "*fp32")}, (kernel, seen)
    # The selection kernel, every rule of the coverage case.
    rules = {v["constexprs"]["RULE"] for v in variants if v["kernel"] == "selection:_select_transfer_kernel"}
    assert {0, 1, 2, 3} <= rules


def test_quick_mode_reads_the_machine_code(quick):
    _, report = quick
    by_kernel = {}
    for v in report["variants"]:
        by_kernel.setdefault(v["kernel"], []).append(v)
    # Anchor attention at D=128 in bf16 runs its products on wgmma (HGMMA) inside the key loops.
    fwd = next(v for v in by_kernel["anchor_attention:_anchor_attn_fwd"]
               if v["constexprs"]["HEAD_DIM"] == 128 and v["constexprs"]["DOT_PRECISION"] == "default")
    assert any(lp["tensor_core"] and lp["mma_flops"] > 0 and lp["global_load_bytes"] > 0 for lp in fwd["loops"])
    # Every loop of every kernel is tied to a source loop through the line table.
    for vs in by_kernel.values():
        for v in vs:
            for lp in v["loops"]:
                assert lp["source"], (v["kernel"], lp)
                assert lp["instructions_min"] <= lp["instructions_body"]


# ---------------------------------------------------------------------------------------------
# The SASS reader on hand-written code
# ---------------------------------------------------------------------------------------------

_SASS = """
	//## File "/k.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
.L_x_1:
	//## File "/k.py", line 12 inlined at "/k.py", line 20
	//## File "/k.py", line 20
        /*0030*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0040*/                   LDG.E.U16 R9, desc[UR4][R10.64] ;
        /*0050*/                   SHFL.BFLY PT, R5, R4, 0x1, 0x1f ;
        /*0060*/              @P1 BRA `(.L_x_2) ;
        /*0070*/                   FADD R4, R4, R5 ;
        /*0080*/                   FADD R4, R4, R5 ;
        /*0090*/                   FADD R4, R4, R5 ;
.L_x_2:
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "/k.py", line 11 inlined at "/k.py", line 20
	//## File "/k.py", line 20
        /*00b0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00c0*/                   ISETP.LT.AND P0, PT, R2, R3, PT ;
        /*00d0*/              @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*00e0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00f0*/                   EXIT ;
.L_x_3:
        /*0100*/                   BRA `(.L_x_3) ;
"""


class _Loops(kc.SourceLoops):
    """Source loops given by hand: /k.py has ``for`` at line 11 (body 12..13) in a helper
    inlined from line 20, which sits in a ``for`` of the kernel at line 19 (body 20..21)."""

    def __init__(self):
        self.loops = {"/k.py": [(11, 12, 13), (19, 20, 21)]}
        self.headers = {"/k.py": {11: (12, 13), 19: (20, 21)}}


def test_sass_loops_and_costs():
    cost = kc.analyse_sass(_SASS, _Loops(), num_warps=8)
    assert cost.instructions == 16  # the self-branch after EXIT is unreachable padding
    (loop,) = cost.loops
    assert loop.innermost and loop.depth == 0
    assert loop.instructions_body == 11
    assert loop.instructions_min == 8  # the predicated branch skips the three FADDs
    assert (loop.barriers, loop.shuffles, loop.global_loads, loop.global_load_bytes) == (1, 1, 2, 18)
    # Its instructions come from the helper's loop (header 11, body line 12) inlined at line 20,
    # inside the kernel's loop at 19: the innermost source loop, reached through line 20, wins.
    assert loop.source == (("/k.py", 20), ("/k.py", 11))
    # Straight line: 3 instructions, the loop skipped, then HGMMA and EXIT.
    assert cost.straight_min == 5
    assert cost.straight_mma_flops == 2 * 64 * 128 * 16 * 2  # two warpgroups of 4 warps
    assert loop.instructions_per_element(2) == pytest.approx(8 * 2 / 18)


_NESTED = """
	//## File "/k.py", line 30
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
	//## File "/k.py", line 12 inlined at "/k.py", line 30
	//## File "/k.py", line 30
        /*0010*/                   LDG.E R4, desc[UR4][R8.64] ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_2:
        /*0030*/                   FADD R4, R4, R5 ;
        /*0040*/              @P0 BRA `(.L_x_2) ;
	//## File "/k.py", line {outer} inlined at "/k.py", line 30
	//## File "/k.py", line 30
        /*0050*/                   ISETP.LT.AND P1, PT, R2, R3, PT ;
        /*0060*/              @P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""


class _NestedLoops(kc.SourceLoops):
    """/k.py: a helper's ``while`` at line 9 (body 10..14) around a ``for`` at 11 (body 12..13),
    inlined at line 30 of a kernel without loops."""

    def __init__(self):
        self.loops = {"/k.py": [(9, 10, 14), (11, 12, 13)]}
        self.headers = {"/k.py": {9: (10, 14), 11: (12, 13)}}


@pytest.mark.parametrize("outer_line", [10, 12])
def test_nested_loops_map_to_nested_source_loops(outer_line):
    # The outer SASS loop holds the inner loop's prologue (line 12); it stands for the while loop
    # whether its own instructions name the while body (line 10) or only the inner loop's lines.
    cost = kc.analyse_sass(_NESTED.replace("{outer}", str(outer_line)), _NestedLoops(), num_warps=4)
    inner, outer = cost.loops
    assert inner.innermost and inner.depth == 1 and inner.instructions_min == 2
    assert not outer.innermost and outer.depth == 0
    assert inner.source == (("/k.py", 30), ("/k.py", 11))
    assert outer.source == (("/k.py", 30), ("/k.py", 9))
    assert outer.global_loads == 1 and inner.global_loads == 0


def test_source_loop_key_follows_the_inlining_chain():
    loops = _Loops()
    # Innermost first: line 12 of the helper, called from line 20 of the kernel.
    assert loops.key_of((("/k.py", 12), ("/k.py", 20))) == (("/k.py", 20), ("/k.py", 11))
    assert loops.key_of((("/k.py", 5), ("/k.py", 20))) == (("/k.py", 19),)
    assert loops.key_of((("/k.py", 5),)) is None
    assert loops.key_of((("/other.py", 12),)) is None
    assert loops.parent((("/k.py", 20), ("/k.py", 11))) == (("/k.py", 19),)
    assert loops.parent((("/k.py", 19),)) is None


def test_mma_flops_and_occupancy():
    hgmma = kc.Instr(0, "HGMMA.64x64x16.F32.BF16", "HGMMA.64x64x16.F32.BF16 R0", None, ())
    hmma = kc.Instr(0, "HMMA.16816.F32.BF16", "HMMA.16816.F32.BF16 R0", None, ())
    assert kc._mma_flops(hgmma, num_warps=8) == 2 * 64 * 64 * 16 * 2
    assert kc._mma_flops(hmma, num_warps=4) == 2 * 16 * 8 * 16 * 4
    assert kc._load_bytes("LDG.E.64.CONSTANT") == 8 and kc._load_bytes("LDG.E") == 4
    # 255 registers x 8 warps fill the register file once; 32 registers x 4 warps are warp-bound.
    assert kc.ctas_per_sm(255, 8, 0) == 1
    assert kc.ctas_per_sm(32, 4, 32) == 16
    assert kc.ctas_per_sm(64, 4, 200 * 1024) == 1  # shared memory bound
    h100 = kc.MACHINES[0]
    assert h100.thread_instructions_per_bf16() == pytest.approx(20.0, rel=0.01)
    assert kc.MACHINES[1].thread_instructions_per_bf16() == pytest.approx(13.9, rel=0.01)


def test_ptxas_report():
    log = ("ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 28 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert kc.parse_ptxas(log) == dict(registers=255, stack_bytes=16, spill_store_bytes=28, spill_load_bytes=12,
                                       named_barriers=1)


# ---------------------------------------------------------------------------------------------
# Specialisation and capture
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_specialise_as_the_jit_does():
    from triton.runtime.jit import JITFunction

    jit = JITFunction(_probe_kernel.fn if hasattr(_probe_kernel, "fn") else _probe_kernel)
    aligned = kc.TensorArg(torch.float32, (64,), (1,), 0, 4)
    misaligned = kc.TensorArg(torch.bfloat16, (64,), (1,), 3, 2)  # a view 6 bytes in
    spec = kc.specialise(kc.Launch(jit, (1, 1, 1), (aligned, misaligned, 1, 32, 17, None), {"BLOCK": 16}))
    names = list(jit.arg_names)
    attrs = {names[k[0]]: v for k, v in spec.attrs.items()}
    assert spec.signature["x_ptr"] == "*fp32" and spec.signature["y_ptr"] == "*bf16"
    assert attrs["x_ptr"] == [["tt.divisibility", 16]] and not attrs["y_ptr"]
    assert spec.signature["one"] == "constexpr" and spec.constexpr_summary()["one"] == 1
    assert attrs["n"] == [["tt.divisibility", 16]] and not attrs["m"]
    assert spec.signature["opt_ptr"] == "constexpr" and spec.constexpr_summary()["opt_ptr"] == "None"
    assert spec.num_warps == 4


def test_capture_sees_a_hopper_launch():
    # The launcher picks its sm_90 configuration (not the interpreter's) for pretend-CUDA tensors.
    s = dict(B=1, Hq=4, Hkv=2, D=128, S=64, N=8, bs=16, dtype=torch.bfloat16)
    launches, info = kc.capture(kc.Case("probe", "test", lambda: kc._anchor_attention(s)))
    names = [launch.name for launch in launches]
    assert names == ["anchor_attention:_anchor_attn_fwd", "anchor_attention:_anchor_attn_bwd_preprocess",
                     "anchor_attention:_anchor_attn_bwd_dkdv", "anchor_attention:_anchor_attn_bwd_dq"]
    fwd = launches[0]
    assert fwd.kwargs["BLOCK_M"] == 128 and fwd.kwargs["num_warps"] == 8 and fwd.kwargs["DOT_PRECISION"] == "default"
    assert all(isinstance(a, kc.TensorArg) for a in fwd.args[:7])
    assert fwd.grid == (8 * 16 // 128 + 1 if 8 * 16 % 128 else 8 * 16 // 128, 1 * 4, 1)


# ---------------------------------------------------------------------------------------------
# Trip counts under the interpreter
# ---------------------------------------------------------------------------------------------


@triton.jit
def _probe_kernel(x_ptr, y_ptr, one, n, m, opt_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n * (pid + 1), BLOCK):  # program p: n * (p + 1) / BLOCK iterations
        acc += tl.load(x_ptr + start % n + tl.arange(0, BLOCK))
    left = m + pid
    while left > 0:  # m + p iterations
        left -= one
    tl.store(y_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc.to(y_ptr.dtype.element_ty))


def test_trip_counts_per_program():
    from triton.runtime.interpreter import InterpretedFunction

    fn = InterpretedFunction(_probe_kernel.fn if hasattr(_probe_kernel, "fn") else _probe_kernel)
    x = torch.randn(64)
    y = torch.empty(3 * 16, dtype=torch.bfloat16)
    counter = kc._LoopCounter(kc.SourceLoops([os.path.abspath(__file__)]))
    kc.instrument_interpreter(counter)
    out = []
    policy = kc.TracePolicy("programs 0 and 2", lambda pid, grid: pid[0] != 1, lambda pid, grid: pid)
    kc._run_traced(kc.Launch(fn, (3, 1, 1), (x, y, 1, 32, 2, None), {"BLOCK": 16}), policy, counter, out)
    (launch,) = out
    assert launch["kernel"].endswith(":_probe_kernel") and set(launch["programs"]) == {"0,0,0", "2,0,0"}
    lines = sorted({int(k.rsplit(":", 1)[1]) for p in launch["programs"].values() for k in p})
    for_line, while_line = lines
    for pid, trips in ((0, (2, 2)), (2, (6, 4))):
        counts = launch["programs"][f"{pid},0,0"]
        got = tuple(counts[f"{os.path.abspath(__file__)}:{line}"] for line in (for_line, while_line))
        assert got == trips, (pid, counts)


def test_static_bounds_lookup(tmp_path):
    # What the benchmarks print next to a measurement: the case's bound and its launches' bounds.
    result = {"cases": [{"name": "c", "bounds": {"H200": {"time_s": 3e-6}},
                         "launches": [{"kernel": "m:k", "bounds": {"H200": {"bound_s": 1e-6}}},
                                      {"kernel": "m:k", "bounds": {"H200": {"bound_s": 1.5e-6}}},
                                      {"kernel": "m:j"}]}]}
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(result))
    assert kc.static_bounds("c", "H200", str(path)) == {"total": 3e-6, "m:k": pytest.approx(2.5e-6)}
    assert kc.static_bounds("c", "H100 SXM", str(path)) is None
    assert kc.static_bounds("other", "H200", str(path)) is None
    assert kc.static_bounds("c", "H200", str(tmp_path / "missing.json")) is None
