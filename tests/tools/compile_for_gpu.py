"""Compile ddiff's Triton kernels to PTX for a GPU target, without a GPU.

Run in a process without TRITON_INTERPRET: ``python tests/tools/compile_for_gpu.py [arch]``.
Catches what the interpreter does not: type errors of compiled Triton, loop-carried type
changes, register spills (reported). Exits non-zero on the first failure.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ddiff.kernels import anchor_attention as ka  # noqa: E402
from ddiff.kernels import sampling as ks  # noqa: E402


def compile_one(kernel, signature, constexprs, arch, num_warps, num_stages=3):
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return "st.local" in ptx


def main(arch=90):
    row = {"logits_ptr": "*bf16", "stride_row": "i64", "V": "i32", "num_tiles": "i32", "mask_ptr": "*i1",
           "supp_ptr": "*i64", "csupp_ptr": "*i64", "gate_ptr": "*fp32", "query_ptr": "*i64", "temp_ptr": "*fp32", "temp_value": "fp32",
           "top_k_ptr": "*i64", "top_k_value": "i32", "top_p_ptr": "*fp32", "top_p_value": "fp32",
           "min_p_ptr": "*fp32", "min_p_value": "fp32", "seed_ptr": "*i64", "seed_stride": "i32",
           "seed_value": "i64", "offset": "i64", "tokens_ptr": "*i64", "conf_ptr": "*fp32",
           "argmax_ptr": "*i64"}
    dtypes = (("*bf16", 16), ("*fp16", 13), ("*fp32", 0), ("*bf16", 16))
    for conf, (dtype, shift) in enumerate(dtypes):  # every confidence kind, every dtype once
        for filtered in (False, True):
            for flags in ((False, 0, False, False), (True, 2, True, True)):
                has_mask, n_supp, has_gate, has_query = flags
                sig = dict(row, logits_ptr=dtype)
                const = dict(HAS_MASK=has_mask, NUM_SUPPRESS=n_supp, HAS_GATE=has_gate, HAS_QUERY=has_query,
                             NUM_CONF_SUPPRESS=n_supp, TOP_P_BD3LM=has_gate, RETURN_ARGMAX=has_query,
                             HAS_TEMP=filtered, HAS_TOP_K=filtered, HAS_TOP_P=filtered, HAS_MIN_P=False,
                             HAS_SEED=True, FILTERED=filtered, CONFIDENCE=conf, CONF_RAW=conf % 2 == 0,
                             KEY_SHIFT=shift, NUM_PIVOTS=ks.NUM_PIVOTS, SEARCH_BLOCK=ks.SEARCH_BLOCK,
                             NOISE_TILE=ks.NOISE_TILE, TILE_BLOCK=ks.NOISE_TILE, SKIP_INACTIVE=has_mask)
                spills = compile_one(ks._row_kernel, sig, const, arch, 8 if filtered else 4)
                print(f"_row_kernel {dtype} filtered={filtered} conf={conf} flags={flags}: ok"
                      + (" (spills)" if spills else ""))
    flt = {"logits_ptr": "*bf16", "stride_row": "i64", "out_ptr": "*bf16", "out_stride_row": "i64", "bad_ptr": "*i8",
           "rows_mask_ptr": "*i8", "V": "i32", "top_k_ptr": "*i64", "top_k_value": "i32", "top_p_ptr": "*fp32",
           "top_p_value": "fp32", "min_p_ptr": "*fp32", "min_p_value": "fp32"}
    compile_one(ks._filter_logits_kernel, flt, dict(HAS_TOP_K=True, HAS_TOP_P=False, HAS_MIN_P=True, KEY_SHIFT=16,
                                                    TOP_P_BD3LM=True,
                                                    NUM_PIVOTS=ks.NUM_PIVOTS, SEARCH_BLOCK=ks.SEARCH_BLOCK), arch, 8)
    print("_filter_logits_kernel: ok")
    compile_streaming_and_candidates(arch)
    compile_attention(arch)
    return 0


_POINTERS = {"mask_ptr": "*i1", "gate_ptr": "*fp32", "seed_ptr": "*i64", "rows_out_ptr": "*i32", "count_ptr": "*i32",
             "tokens_ptr": "*i64", "conf_ptr": "*fp32", "argmax_ptr": "*i64", "rows_ptr": "*i32", "temp_ptr": "*fp32",
             "stats_ptr": "*fp32", "supp_ptr": "*i64", "csupp_ptr": "*i64", "query_ptr": "*i64", "fparams_ptr": "*fp32",
             "top_k_ptr": "*i64", "cand_ptr": "*i32", "fallback_ptr": "*i8", "bad_ptr": "*i8"}
_SCALARS = {"temp_value": "fp32", "top_p_value": "fp32", "min_p_value": "fp32", "stride_row": "i64",
            "out_stride_row": "i64", "seed_value": "i64", "offset": "i64"}


def _sampling_signature(kernel, dtype):
    """Argument types of a sampling kernel by name (logits and outputs in ``dtype``)."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            continue
        if name in ("logits_ptr", "out_ptr"):
            sig[name] = dtype
        else:
            sig[name] = _POINTERS.get(name) or _SCALARS.get(name, "i32")
    return sig


def compile_streaming_and_candidates(arch):
    """The unfiltered streaming pass + finalize, the row selection and the candidate kernels."""
    for dtype, shift in (("*bf16", 16), ("*fp16", 13), ("*fp32", 0)):
        for m2, t1, raw in ((False, False, False), (True, False, False), (False, True, True)):
            flags = dict(WANT_M2=m2, WANT_T1=t1, WANT_RAW=raw)
            compile_one(ks._tile_pass_kernel, _sampling_signature(ks._tile_pass_kernel, dtype),
                        dict(flags, CHUNKS=ks.TILE_CHUNKS, NOISE_TILE=ks.NOISE_TILE), arch, 1)
            compile_one(ks._finalize_kernel, _sampling_signature(ks._finalize_kernel, dtype),
                        dict(flags, NUM_SUPPRESS=2, NUM_CONF_SUPPRESS=1 if raw else 0, CONFIDENCE=2 if t1 else int(m2),
                             CONF_RAW=raw, TILES_BLOCK=256, CHUNKS=ks.TILE_CHUNKS,
                             LANES=ks.NOISE_TILE // ks.TILE_CHUNKS, NOISE_TILE=ks.NOISE_TILE), arch, 4)
        for conf in range(4):
            compile_one(ks._filtered_row_kernel, _sampling_signature(ks._filtered_row_kernel, dtype),
                        dict(NUM_SUPPRESS=conf % 2, NUM_CONF_SUPPRESS=conf // 2, TOP_P_BD3LM=conf == 1,
                             CONFIDENCE=conf, CONF_RAW=conf == 0, KEY_SHIFT=shift, NUM_PIVOTS=ks.NUM_PIVOTS,
                             BLOCK=ks.FILTER_BLOCK, CAP=ks.CANDIDATES, NOISE_TILE=ks.NOISE_TILE), arch, 8)
        compile_one(ks._filter_candidates_kernel, _sampling_signature(ks._filter_candidates_kernel, dtype),
                    dict(TOP_P_BD3LM=False, KEY_SHIFT=shift, NUM_PIVOTS=ks.NUM_PIVOTS, BLOCK=ks.FILTER_BLOCK,
                         CAP=ks.CANDIDATES), arch, 8)
        print(f"streaming pass / finalize / candidate kernels {dtype}: ok")
    compile_one(ks._select_rows_kernel, _sampling_signature(ks._select_rows_kernel, "*bf16"), dict(BLOCK=1024), arch, 4)
    print("_select_rows_kernel: ok")


def _attention_signature(kernel, dtype):
    sig = {}
    for name in kernel.arg_names:
        if name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("ANC", "PERM"):
            sig[name] = "*i32"
        elif name.isupper():
            sig[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name[0].islower():
            sig[name] = "i32"
    return sig


def compile_attention(arch):
    """The anchor-attention forward and backward kernels at the Hopper launch configurations."""
    cases = [("bf16", 64, ka._GPU_CONFIGS[("large", 64)]), ("bf16", 128, ka._GPU_CONFIGS[("large", 128)]),
             ("fp32", 64, ka._FP32_CONFIGS[64])]
    for dtype, head_dim, ((fm, fn, fw, fs), (km, kn, kw, kst), (qm, qn, qw, qs)) in cases:
        precision = "ieee" if dtype == "fp32" else "default"
        common = dict(BLOCK_SIZE=16, HEAD_DIM=head_dim)
        compile_one(ka._anchor_attn_fwd, _attention_signature(ka._anchor_attn_fwd, dtype),
                    dict(common, BLOCK_M=fm, BLOCK_N=fn, DOT_PRECISION=precision), arch, fw, fs)
        compile_one(ka._anchor_attn_bwd_preprocess, _attention_signature(ka._anchor_attn_bwd_preprocess, dtype),
                    dict(common, BLOCK_M=fm), arch, 4)
        compile_one(ka._anchor_attn_bwd_dkdv, _attention_signature(ka._anchor_attn_bwd_dkdv, dtype),
                    dict(common, BLOCK_M=km, BLOCK_N=kn, SEARCH_BLOCK=256, DOT_PRECISION=precision), arch, kw, kst)
        compile_one(ka._anchor_attn_bwd_dq, _attention_signature(ka._anchor_attn_bwd_dq, dtype),
                    dict(common, BLOCK_M=qm, BLOCK_N=qn, DOT_PRECISION=precision), arch, qw, qs)
        print(f"anchor attention {dtype} D={head_dim}: ok")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
