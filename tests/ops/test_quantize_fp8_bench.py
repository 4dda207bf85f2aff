"""``dmdr-fast bench quantize-fp8`` runs on CPU with what is available and reports every provider."""

from __future__ import annotations

import json

from dmdr_fast.cli import main


def test_bench_quantize_fp8_cpu_json(tmp_path, capsys):
    path = tmp_path / "q.json"
    rc = main(["bench", "quantize-fp8", "--device", "cpu", "--shape", "3x5x33", "--fp8", "e5m2",
               "--providers", "eager,torch,cpp,cuda", "--reps", "2", "--warmup", "1",
               "--json", str(path)])  # fmt: skip
    assert rc == 0
    result = json.loads(path.read_text())
    rows = {r["provider"]: r for r in result["rows"]}
    assert result["bytes_moved"] == 3 * 5 * 33 * (2 + 1) + 4 * 15  # bf16 read, fp8 + scales written
    assert rows["eager"]["status"] == "ok" and rows["eager"]["vs_eager"] == 1.0
    assert rows["eager"]["max_abs_err"] == 0.0 and rows["torch"]["max_abs_err"] == 0.0
    if rows["cpp"]["status"] == "ok":  # _C built: bit-exact, so the dequantised values agree
        assert rows["cpp"]["max_abs_err"] == 0.0 and rows["cpp"]["gbps"] > 0
    assert rows["cuda"]["status"].startswith("unavailable")
    assert "copy ceiling" in capsys.readouterr().out
