"""AOT-compile the Gluon GEMM kernel for sm_90a on the CPU and report SASS facts (dev helper)."""
import json
import sys

import torch
from triton.runtime.jit import mangle_type

from fp8gemm.kernels import gemm_gluon as gg
from fp8gemm.testing import compile_sm90, sass_count


def signature_and_constexprs(mode="dense", bm=128, bn=128, stages=5, tma_store=True, has_c=False,
                             has_signal=False, out=torch.bfloat16, group_m=8, producer_regs=40, k_rotate=False):
    gl = gg.gl
    m, n, k = 256, 256, 512
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    b = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    d = torch.empty(m, n, dtype=out)
    sig = {
        "a_desc": mangle_type(gg._desc2d(a, m, (bm, 128), gl.float8e4nv)),
        "b_desc": mangle_type(gg._desc2d(b, n, (bn, 128), gl.float8e4nv)),
        "d_desc": mangle_type(gg._desc2d(d, m, (bm, bn), gl.bfloat16)) if tma_store else "constexpr",
        "d_ptr": "*bf16" if out == torch.bfloat16 else "*fp32",
        "c_ptr": "*fp32" if has_c else ("*bf16" if out == torch.bfloat16 else "*fp32"),
        "sfa_ptr": "*fp32", "sfb_ptr": "*fp32",
        "masked_m_ptr": "*i32", "m_indices_ptr": "*i32", "signal_ptr": "*i32",
    }
    for name in ["M", "N", "K", "G", "s_dg", "s_dm", "s_cg", "s_cm", "s_ag", "s_am", "s_ak", "s_bg", "s_bn", "s_bk"]:
        sig[name] = "i32"
    mode_id = gg._MODES[mode]
    nw = 8 if bm == 128 else 4
    cx = dict(MODE=mode_id, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group_m, STAGES=stages, TMA_STORE=tma_store,
              HAS_C=has_c, HAS_SIGNAL=has_signal, SB_SCALAR=(128 % bn == 0), PRODUCER_REGS=producer_regs, K_ROTATE=k_rotate)
    if not tma_store:
        cx["d_desc"] = None
    return sig, cx, nw


def compile_variant(**kw):
    sig, cx, nw = signature_and_constexprs(**kw)
    maxnreg = gg.GluonConfig(kw.get("bm", 128), kw.get("bn", 128), 1, nw).maxnreg
    r = compile_sm90(gg.fp8_gemm_ws_kernel, sig, cx, num_warps=nw, gluon=True, maxnreg=maxnreg,
                     divisible_by_16=["sfa_ptr", "sfb_ptr", "d_ptr", "c_ptr"])
    return r


if __name__ == "__main__":
    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    r = compile_variant(**kw)
    out = {k: r[k] for k in ("regs", "shared", "stack", "local")}
    for op in ("QGMMA", "HGMMA", "LDL", "STL", "WARPGROUP", "SETMAXNREG", "USETMAXREG", "UTMALDG", "UTMASTG", "SYNCS", "BAR"):
        out[op] = sass_count(r["sass"], op)
    print(json.dumps(out))
    if len(sys.argv) > 2:
        open(sys.argv[2] + ".sass", "w").write(r["sass"])
        open(sys.argv[2] + ".ptx", "w").write(r["ptx"])
