"""`edgec bench OUT --json`: edgec's runtime and mlx-lm measured on the same folder in the same run."""

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


def test_bench_refuses_a_bad_request(tiny, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny), "--tokens", "1"])
    assert r.exit_code == 2
