"""`edgec bench OUT --json`: edgec's runtime and mlx-lm measured on the same folder in the same run, with edgec's
memory plan beside the resident memory it measured."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgec.cli import main


def test_bench_reports_edgec_and_the_mlx_lm_peer(tiny_mlx):
    r = CliRunner().invoke(main, ["bench", str(tiny_mlx), "--prompt", "16", "--tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    for who in ("edgec", "mlx_lm"):
        assert "error" not in res[who], res[who]
        assert res[who]["decode_tok_s"] > 0 and res[who]["prefill_tok_s"] > 0 and res[who]["peak_rss_bytes"] > 2**20
        assert res[who]["rss_after_load_bytes"] > res[who]["rss_before_load_bytes"] > 0
    plan = res["edgec"]["plan"]
    assert plan["runtime"] == "mlx" and plan["context"] == 16 + 4 and plan["kv"] == "float16"
    held = res["edgec"]["rss_after_load_bytes"] - res["edgec"]["rss_before_load_bytes"]
    assert 0.5 * plan["weights_bytes"] < held < 2 * plan["total_bytes"]


def test_bench_takes_the_runtime_options(tiny_mlx, tiny_onnx):
    r = CliRunner().invoke(main, ["bench", str(tiny_mlx), "--prompt", "8", "--tokens", "2", "--no-peers",
                                  "--compute", "float32-upcast", "--kv-dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["options"] == {"compute": "float32-upcast", "kv_dtype": "float32"}
    assert res["edgec"]["plan"]["weights"].startswith("float32 copies")
    r = CliRunner().invoke(main, ["bench", str(tiny_onnx), "--compute", "float16"])
    assert r.exit_code == 2 and "it can run: float32" in r.output


def test_bench_refuses_a_bad_request(tiny, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny), "--tokens", "1"])
    assert r.exit_code == 2
