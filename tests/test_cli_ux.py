"""Small CLI promises: `harmony parse` reads stdin, `targets` lists the formats each option accepts, `inspect`
prints no unset recipe keys."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgec.cli import main
from edgec.targets import list_targets, load_profile


def invoke(args, input=None, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    assert r.exit_code == code, (r.output, r.exception)
    return r


COMPLETION = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi!<|return|>"


def test_harmony_parse_reads_stdin_as_tokens_or_text(tmp_path):
    from edgec.harmony.tokenizer import Tokenizer

    ids = Tokenizer.default().encode(COMPLETION, allowed_special="all")
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    want = json.loads(invoke(["harmony", "parse", "--tokens-file", tmp_path / "ids.json", "--json"]).stdout)
    assert [(m["channel"], m["text"]) for m in want] == [("analysis", "Think."), ("final", "Hi!")]
    for stdin in (json.dumps(ids), " ".join(map(str, ids)) + "\n", json.dumps({"tokens": ids}), COMPLETION + "\n"):
        assert json.loads(invoke(["harmony", "parse", "--json"], input=stdin).stdout) == want
    r = invoke(["harmony", "parse", "--tokens-file", "-", "--json"], input=json.dumps(ids))
    assert json.loads(r.stdout) == want
    r = invoke(["harmony", "parse"], input="", code=2)
    assert "stdin was empty" in r.stderr


def test_targets_lists_the_formats_each_option_accepts():
    r = invoke(["targets"])
    rows = {line.split("│")[1].strip(): line for line in r.output.splitlines() if line.count("│") > 3}
    for name in list_targets():
        p = load_profile(name)
        cells = [c.strip() for c in rows[name].split("│")[1:-1]]
        for col, cls in ((3, "experts"), (4, "dense")):
            shown = [f.strip() for f in cells[col].split(",")]
            assert sorted(shown) == sorted(p[cls]["supported"]) and shown[0] == p[cls]["default"], (name, cls)
        assert (cells[5] == "-") == ("lm_head" not in p)
    assert "--experts" in r.output and "--dense" in r.output and "default first" in r.output


def test_inspect_prints_no_unset_recipe_keys(tiny_mlx):
    manifest = json.loads((tiny_mlx / "edgec.json").read_text())
    assert None in manifest["recipe"].values()  # the manifest records unset keys, as JSON null
    r = invoke(["inspect", tiny_mlx])
    [line] = [x for x in r.output.splitlines() if "recipe" in x]
    assert "None" not in line and "dense=" in line
