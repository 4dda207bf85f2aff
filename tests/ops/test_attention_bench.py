"""``dmdr-fast bench attention`` runs on CPU with what is available and reports every provider."""

from __future__ import annotations

import json

from dmdr_fast.cli import main


def test_bench_attention_cpu_json(tmp_path, capsys):
    path = tmp_path / "att.json"
    rc = main(["bench", "attention", "--device", "cpu", "--shape", "1x2x33x17x16", "--pad-frac", "0.2",
               "--providers", "sdpa,sdpa-math,torch,xformers,fp8", "--reps", "2", "--warmup", "1",
               "--json", str(path)])  # fmt: skip
    assert rc == 0
    result = json.loads(path.read_text())
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["sqnr_db"] > 100  # fp32 vs fp32 reference
    assert rows["torch"]["bwd_tflops"] > 0 and result["matmul_tflops"] > 0
    assert rows["xformers"]["status"].startswith("unavailable")
    assert rows["fp8"]["impl"] == "fp8 torch emulation" and 15 < rows["fp8"]["sqnr_db"] < 60
    best = max(r["fwd_vs_sdpa"] for r in rows.values() if r["provider"].startswith("sdpa"))
    assert abs(best - 1.0) < 1e-9  # ratios are to the best SDPA kernel of the same run
    assert "matmul ceiling" in capsys.readouterr().out
