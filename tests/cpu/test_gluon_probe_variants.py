"""CPU checks of ``benchmarks/gluon_probe.py --variants``: the per-variant analysis of synthetic probe stamps
(wide/split: per-slice events, wait(0) semantics, the wide tile's period normalised per 128x128x128) and the
summary table (no GPU needed)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fp8gemm.kernels import gemm_gluon as gg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import gluon_probe as P  # noqa: E402

NUM_K, STAGES, GRID = 56, 5, 2


def _raw(variant, per):
    """Stamps of a steady loop with slice period ``per``: full +40, issued +80, done +400, arrived +420,
    promoted +500 after pre_bar; wide: the left half done at +60."""
    raw = torch.zeros(GRID, gg.PROBE_ROWS, gg.PROBE_SLICES, gg.PROBE_EVENTS, dtype=torch.int64)
    for c in range(GRID):
        for w in range(2):
            for s in range(gg.PROBE_SLICES):
                t = 1000 + s * per + 50 * w
                for e, dt in ((gg.EV_C_PRE_BAR, 0), (gg.EV_C_PRE_WAIT, 10), (gg.EV_C_FULL, 40),
                              (gg.EV_C_ISSUED, 80), (gg.EV_C_MMA_DONE, 400), (gg.EV_C_ARRIVED, 420),
                              (gg.EV_C_PROMOTED, 500)):
                    raw[c, w, s, e] = t + dt
                if variant == "wide":
                    raw[c, w, s, gg.EV_C_HALF] = t + 60
        for s in range(gg.PROBE_SLICES):
            raw[c, 2, s, :3] = torch.tensor([s * per + 1, s * per + 100, s * per + 150])
    return raw


@pytest.mark.parametrize("variant", P.VARIANTS)
def test_analyse_variants(variant):
    assert gg.EV_C_HALF < gg.PROBE_EVENTS and gg.EV_C_HALF not in range(7)
    mt, _, queued = P.analyse_runs([_raw(variant, 600)], gg, NUM_K, STAGES, [1] * GRID, variant)
    st = {k: P.stat(mt[k])["median"] for k, _ in P.DESCR}
    assert st["period"] == 600 and st["done_period"] == 600 and st["promote"] == 80
    if variant == "default":      # wait(1): from the NEXT slice's issue to this slice's done
        assert st["mma_wait"] == 400 - (600 + 80) and st["left_half"] is None and queued[1] > 0
    else:                         # wait(0): this slice's own MMA, issued -> done; nothing is ever queued
        assert st["mma_wait"] == 400 - 80 and queued[0] == 0
        assert st["left_half"] == (20 if variant == "wide" else None)


def test_table_and_variant_reading(capsys):
    results = []
    for variant, per0, per3 in (("default", 744, 512), ("wide", 1100, 1030), ("split", 530, 515)):
        rows = []
        for mode, per in ((0, per0), (3, per3)):
            mt, _, q = P.analyse_runs([_raw(variant, per)], gg, NUM_K, STAGES, [1] * GRID, variant)
            rows.append(dict(mode=mode, name=P.DIAG_NAMES[mode], us=200.0, tflops=1000.0, sm_ghz_in_kernel=1.6,
                             cycles_per_slice_whole_program=700.0, mma_queued_fraction=q[0] / max(1, q[1]),
                             stats={k: P.stat(mt[k]) for k, _ in P.DESCR}, check={} if mode == 0 else None))
        results.append(dict(shape=[4096, 4096, 7168], variant=variant, correct=True, modes=rows,
                            config=dict(block_m=128, block_n=256 if variant == "wide" else 128),
                            hints=P.diag_hints({r["mode"]: r for r in rows})))
    lines = P.variant_hints(results)
    assert any("split" in h and "CONFIRMED" in h for h in lines), lines
    assert any("wide: mode-0 period 550 per 128^3" in h for h in lines), lines
    P.print_diag_table(results)
    out = capsys.readouterr().out
    assert "   wide    0" in out and "  split    3" in out
