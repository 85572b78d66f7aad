"""The A/B loop shared by the benchmark scripts (``fp8gemm.bench.core.ab_rounds``), on the CPU with its
check and timer replaced: wrong and failing runs are reported and never timed, the others are timed in
interleaved rounds and their best round is kept."""
import pytest
import torch

from fp8gemm.bench import core


def test_ab_rounds_checks_before_timing(monkeypatch, capsys):
    out = torch.zeros(4)
    want = torch.ones(4)
    timed = []

    def fake_check(fn, o, w):
        fn()
        return bool(torch.equal(o, w)), float((o - w).abs().max())

    def fake_time(fn):
        timed.append(fn.__name__)
        return {"good": 10.0, "also_good": 20.0}[fn.__name__] + len(timed)

    monkeypatch.setattr(core, "checked_run", fake_check)
    monkeypatch.setattr(core, "time_us", fake_time)

    def good():
        out.fill_(1.0)

    def also_good():
        out.fill_(1.0)

    def wrong():
        out.fill_(2.0)

    def broken():
        raise RuntimeError("does not build")

    rows = core.ab_rounds("case", {"good": good, "wrong": wrong, "broken": broken, "also_good": also_good},
                          out, want, rounds=2, flops=2e9, baseline_us=30.0)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"good", "wrong", "broken", "also_good"}
    assert timed == ["good", "also_good", "good", "also_good"]          # interleaved, wrong/broken never timed
    assert by["good"]["rounds"] == [11.0, 13.0] and by["good"]["us"] == 11.0
    assert by["also_good"]["us"] == 22.0
    assert not by["wrong"]["ok"] and "us" not in by["wrong"]
    assert not by["broken"]["ok"] and "does not build" in by["broken"]["error"]
    text = capsys.readouterr().out
    assert "wrong" in text and "WRONG" in text and "FAILED RuntimeError" in text
    assert "vs cuBLAS 30.0 us: 2.727x" in text                         # 30 / 11


def test_run_cases_interleaves_rounds_and_keeps_the_best(monkeypatch, capsys):
    """``run_cases(rounds=3)``: the implementations of a case alternate within each round, each keeps its best
    round (all rounds in ``rounds_us``), the speed ratios use the best rounds, and one that fails is reported as
    NaN and not timed again."""
    calls = []
    fake = {"ours": [12.0, 10.0, 11.0], "peer": [20.0, 22.0, 21.0]}

    def fake_time(fn):
        calls.append(fn.__name__)
        if fn.__name__ == "broken":
            raise RuntimeError("no")
        return fake[fn.__name__][sum(c == fn.__name__ for c in calls) - 1]

    def ours():
        pass

    def peer():
        pass

    def broken():
        pass

    monkeypatch.setattr(core, "time_us", fake_time)
    monkeypatch.setattr(core, "card_name", lambda: "H100")
    case = core.Case("gemm", "m1 n1 k1", 2e6, 1e6, {"ours": ours, "peer": peer, "broken": broken})
    rows = {r["impl"]: r for r in core.run_cases([case], progress=False, rounds=3)}
    assert calls == ["ours", "peer", "broken", "ours", "peer", "ours", "peer"]
    assert rows["ours"]["us"] == 10.0 and rows["ours"]["rounds_us"] == [12.0, 10.0, 11.0]
    assert rows["peer"]["us"] == 20.0
    assert abs(rows["ours"]["speedup_vs_peer"] - 2.0) < 1e-12
    assert rows["broken"]["us"] != rows["broken"]["us"]          # NaN
    assert "time failed" in capsys.readouterr().err


def test_environment_knobs_are_read_in_runtime(monkeypatch):
    """The A/B knobs of the casts and the benchmarks' flush are read through fp8gemm.runtime (the one place the
    environment is read), with their defaults when unset and a clear error for a bad flush mode."""
    from fp8gemm import runtime
    for name in ("FP8GEMM_STREAM_EVICT", "FP8GEMM_STORE_EVICT", "FP8GEMM_BENCH_FLUSH"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.stream_evict() is None and runtime.store_evict() == "" and runtime.bench_flush() == "write"
    monkeypatch.setenv("FP8GEMM_STREAM_EVICT", "")
    monkeypatch.setenv("FP8GEMM_STORE_EVICT", ".cs")
    monkeypatch.setenv("FP8GEMM_BENCH_FLUSH", "read")
    assert runtime.stream_evict() == "" and runtime.store_evict() == ".cs" and runtime.bench_flush() == "read"
    monkeypatch.setenv("FP8GEMM_BENCH_FLUSH", "none")
    with pytest.raises(ValueError, match="FP8GEMM_BENCH_FLUSH"):
        runtime.bench_flush()
