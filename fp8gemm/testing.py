"""Helpers for tests and benchmarks: the GEMM error metric, poisoning, signal checks, timing."""
from __future__ import annotations

import math

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64 (0 means identical).

    Returns ``nan`` if either side holds a NaN, so a test comparing against a threshold fails.
    """
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0 if torch.equal(x, y) else 1.0
    return float(1 - 2 * (x * y).sum() / denominator)


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a tensor's bytes, so that comparisons are bit-exact (NaNs compare by their bits)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t.view(torch.uint8) if t.element_size() == 1 else t


def count_bit_mismatches(got, want) -> int:
    """Elements whose bits differ, summed over pairs of tensors (moved to the CPU to compare)."""
    return sum(int((bit_view(g.cpu()) != bit_view(w.cpu())).sum()) for g, w in zip(got, want))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with a value no kernel produces (NaN for floats, -7 for ints)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


def check_signal(signal: torch.Tensor, masked_m: torch.Tensor, max_m: int, n: int,
                 block_m: int, threshold: int) -> None:
    """Assert the SBO counters after a masked GEMM with ``enable_overlap=True`` (DESIGN.md §3).

    Every m-block i of group g with ``i * block_m < masked_m[g]`` holds exactly ``threshold``;
    every other counter is 0.  Raises ``AssertionError`` naming the first wrong counter.
    """
    blocks = math.ceil(max_m / block_m)
    got = signal.detach().cpu().to(torch.int64)
    masked = masked_m.detach().cpu().tolist()
    if got.numel() < len(masked) * blocks:
        raise AssertionError(f"signal has {got.numel()} counters, needs {len(masked) * blocks}")
    for g, m in enumerate(masked):
        for i in range(blocks):
            want = threshold if i * block_m < m else 0
            have = int(got[g * blocks + i])
            if have != want:
                raise AssertionError(f"signal[{g * blocks + i}] (group {g}, m-block {i}, masked_m {m}) "
                                     f"is {have}, expected {want}")


# -------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90a (works on a machine without a GPU)
# -------------------------------------------------------------------------------------

def _triton_bin(tool: str) -> str:
    import os

    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found in the triton wheel at {path}")
    return path


def compile_sm90(kernel, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, num_ctas: int = 1, gluon: bool = False,
                 divisible_by_16: list | tuple = (), **extra_options) -> dict:
    """Compile a ``@triton.jit`` (or ``@gluon.jit``) kernel for ``GPUTarget("cuda", 90, 32)`` without a GPU.

    Returns ``{"sass": str, "regs": int, "shared": int, "stack": int, "local": int, "ptx": str}``;
    ``regs``/``stack``/``local`` come from ``cuobjdump -res-usage``.  Give the arguments the JIT would
    specialise as it does at run time: integers equal to 1 (unit strides) as ``constexprs``, and pointers
    and integers that are multiples of 16 in ``divisible_by_16`` (without that, loads are not vectorised
    and the kernel looks worse than it runs).  ``extra_options`` go to the compiler as they are (e.g.
    ``maxnreg=168`` for a warp-specialised Gluon kernel); a Gluon TMA descriptor's signature entry is the
    string ``triton.runtime.jit.mangle_type(descriptor)`` gives.  The kernel must be a real
    ``JITFunction``: run this in a process where ``TRITON_INTERPRET`` is not set (see
    :func:`compile_sm90_in_subprocess`).
    """
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = dict(constexprs or {})
    sig = dict(signature)
    for name in constexprs:
        sig.setdefault(name, "constexpr")
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = Source(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "num_ctas": num_ctas,
                                       **extra_options})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_triton_bin("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
        res = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", res)
        return int(m.group(1)) if m else -1

    return {"sass": sass, "regs": field("REG"), "stack": field("STACK"), "local": field("LOCAL"),
            "shared": int(compiled.metadata.shared), "ptx": compiled.asm["ptx"]}


def compile_sm90_in_subprocess(module: str, kernel: str, signature: dict, constexprs: dict | None = None,
                               **options) -> dict:
    """:func:`compile_sm90` in a fresh interpreter with ``TRITON_INTERPRET`` unset.

    ``module``/``kernel`` name the kernel (e.g. ``"fp8gemm.kernels.quant"``, ``"per_token_cast_kernel"``).
    """
    import glob
    import hashlib
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    import tempfile

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    payload = json.dumps({"module": module, "kernel": kernel, "signature": signature,
                          "constexprs": constexprs or {}, "options": options}, sort_keys=True)
    # Triton's cache key for an ASTSource built from named constexprs hashes their values, not their names:
    # two optional flags of one kernel, each set alone, collide and the second compile returns the
    # first one's binary.  A cache directory per request (named by its full description) keeps the reuse
    # across runs without the collisions.  The text of the module's package is part of the name too: Triton's
    # key covers the kernels' own source, not line numbers, so an edit elsewhere would otherwise return a
    # binary whose PTX ``.loc`` lines (which source-attribution tests read) point at the old text.  (A module
    # this process cannot find, e.g. one on the subprocess's path only, is named by its name alone.)
    text = hashlib.sha256()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.py"))):
            with open(path, "rb") as f:
                text.update(f.read())
    text_digest = text.hexdigest()
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "fp8gemm_aot_cache")
    env["TRITON_CACHE_DIR"] = os.path.join(
        base, "aot-" + hashlib.sha256((payload + text_digest).encode()).hexdigest()[:24])
    code = ("import json,sys,importlib\n"
            "from fp8gemm.testing import compile_sm90\n"
            "p=json.loads(sys.stdin.read())\n"
            "k=getattr(importlib.import_module(p['module']),p['kernel'])\n"
            "r=compile_sm90(k,p['signature'],p['constexprs'],**p['options'])\n"
            "sys.stdout.write('@@JSON@@'+json.dumps(r))\n")
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or "@@JSON@@" not in proc.stdout:
        raise RuntimeError(f"AOT compile of {module}.{kernel} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("@@JSON@@", 1)[1])


def ptxas_log(ptx: str) -> str:
    """What ``ptxas -arch=sm_90a -v`` says about ``ptx`` (from :func:`compile_sm90`'s ``"ptx"``): the
    register/spill report and warnings such as C7514/C7515 (asynchronous wgmma serialised)."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        return subprocess.run([_triton_bin("ptxas"), "-arch=sm_90a", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True).stderr


def sass_count(sass: str, opcode: str) -> int:
    """How many SASS instructions start with ``opcode`` (e.g. ``"QGMMA"``, ``"HGMMA"``, ``"LDL"``)."""
    import re
    return len(re.findall(rf"\b{opcode}[\.\s]", sass))


def sass_wide_loads(sass: str) -> int:
    """16-byte global loads (``LDG.E.128``), with or without the evict-first hint (``LDG.E.EF.128``)."""
    return sass_count(sass, "LDG.E.128") + sass_count(sass, "LDG.E.EF.128")


def sass_opcodes(sass: str) -> list[str]:
    """The SASS instructions' opcodes in order (predicates dropped), for instruction counts and order checks."""
    import re
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)


def make_moe_weights(num_experts: int, hidden: int, inter: int, seed: int = 0, device="cpu", scale: float = 1.0):
    """Random block-scaled FP8 expert weights (the same on every rank for a given seed)."""
    from . import reference
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * (scale / hidden ** 0.5)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * (scale / inter ** 0.5)
    q13 = [reference.per_block_cast_to_fp8(w) for w in w13]
    q2 = [reference.per_block_cast_to_fp8(w) for w in w2]
    out13 = (torch.stack([a for a, _ in q13]).to(device), torch.stack([b for _, b in q13]).to(device))
    out2 = (torch.stack([a for a, _ in q2]).to(device), torch.stack([b for _, b in q2]).to(device))
    return out13, out2
