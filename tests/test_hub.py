"""Hugging Face ids as model arguments: resolved from a Hugging Face cache the tests build (huggingface_hub's layout:
blobs, snapshot symlinks, refs/main), never downloaded, converted once into edgec's cache (a temporary folder:
conftest sets EDGEC_CACHE_DIR and HF_HUB_CACHE)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgec.cli import main
from edgec.hub import cache_dir, hf_cache_dir, snapshot

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hf_cache(root: Path, repo: str, source: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """`source`'s files as huggingface_hub stores a download: content-addressed blobs, a snapshot of relative
    symlinks (copies where the platform has no symlinks) and refs/<ref> naming the commit."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            link.write_bytes(data)
    if ref:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tiny) -> tuple[str, Path]:
    """`tiny` (its HF layout, without original/) in the session's Hugging Face cache as edgec-test/tiny."""
    src = tiny.parent / "hf-only"
    if not src.exists():
        src.mkdir()
        for f in tiny.iterdir():
            if f.is_file():
                (src / f.name).symlink_to(f)
    return "edgec-test/tiny", fill_hf_cache(hf_cache_dir(), "edgec-test/tiny", src)


def invoke(args, code=0, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    assert r.exit_code == code, (r.output, r.exception)
    assert "Traceback" not in r.output
    return r


def test_the_test_caches_are_temporary():
    home = Path.home()
    for p in (cache_dir(), hf_cache_dir()):
        assert not p.resolve().is_relative_to(home / ".cache"), p


def test_hub_id_converts_once_into_the_cache_and_reuses_it(hub):
    repo, snap = hub
    args = ["chat", repo, "--target", "mlx", "--max-tokens", 2, "--temperature", 0, "--max-context", 256, "--stats"]
    first = invoke(args, input="hi\n")
    out = cache_dir() / "models" / "edgec-test--tiny" / COMMIT / "mlx"
    [note] = [x for x in first.stderr.splitlines() if "converting" in x]
    assert f"first run of {repo} for mlx" in note and str(out) in note and COMMIT[:12] in note
    manifest = json.loads((out / "edgec.json").read_text())
    assert manifest["target"] == "mlx" and Path(manifest["source"]["path"]).resolve() == snap.resolve()
    stamp = (out / "edgec.json").stat().st_mtime_ns
    second = invoke(args, input="hi\n")
    assert "converting" not in second.stderr and "numpy reference" not in second.stderr
    assert (out / "edgec.json").stat().st_mtime_ns == stamp
    assert re.findall(r"decode=2", second.stdout) == re.findall(r"decode=2", first.stdout) == ["decode=2"]
    # without --target, the conversion made earlier is the one opened (not the slow source)
    third = invoke(["generate", repo, "--prompt", "hi", "--max-tokens", 1, "--max-context", 256])
    assert "numpy reference" not in third.stderr and "converting" not in third.stderr


def test_hub_id_without_a_conversion_runs_the_source_and_names_the_fast_way(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    fill_hf_cache(tmp_path / "hf", "edgec-test/other", tiny, ref=None)  # a pinned download: no refs/main
    r = invoke(["generate", "edgec-test/other", "--prompt", "hi", "--max-tokens", 1, "--max-context", 256])
    [line] = [x for x in r.stderr.splitlines() if "numpy reference" in x]
    assert line.endswith("For a fast runtime: edgec chat edgec-test/other --target mlx")


def test_a_missing_hub_id_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    r = invoke(["chat", "openai/gpt-oss-20b", "--target", "mlx"], code=2)
    [line] = r.stderr.strip().splitlines()
    assert f"openai/gpt-oss-20b is not in the Hugging Face cache ({tmp_path / 'empty'})" in line
    assert line.endswith('hf download openai/gpt-oss-20b --exclude "original/*" --exclude "metal/*"')
    assert not (cache_dir() / "models" / "openai--gpt-oss-20b").exists()
    r = invoke(["generate", "no/such/folder", "--prompt", "hi"], code=2)
    assert "no/such/folder: no such folder" in r.stderr


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "xdg"}, {"HF_HOME": "home"},
                                 {"HF_HOME": "home", "HF_HUB_CACHE": "hub"}, {"HUGGINGFACE_HUB_CACHE": "legacy"}])
def test_hf_cache_location_follows_huggingface_hub(env, tmp_path):
    """The same folder as huggingface_hub's own `constants.HF_HUB_CACHE`, from the same variables."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
    base.update(HOME=str(tmp_path), **{k: str(tmp_path / v) for k, v in env.items()})
    code = "from edgec.hub import hf_cache_dir; from huggingface_hub import constants; " \
           "print(hf_cache_dir()); print(constants.HF_HUB_CACHE)"
    ours, theirs = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                                  check=True).stdout.splitlines()
    assert Path(ours) == Path(theirs) and Path(ours).is_relative_to(tmp_path)


def test_revisions_and_targets_are_checked(hub, tiny, tiny_mlx):
    repo, snap = hub
    assert snapshot(f"{repo}@{COMMIT}") == (snap, COMMIT)
    r = invoke(["generate", f"{repo}@main", "--prompt", "hi", "--max-tokens", 1, "--max-context", 256])
    assert r.exit_code == 0
    r = invoke(["chat", repo, "--target", "nonesuch"], code=2)
    assert "unknown target 'nonesuch'" in r.stderr and "converting" not in r.stderr
    r = invoke(["chat", tiny, "--target", "mlx"], code=2)
    assert f"edgec convert {tiny} --target mlx -o OUT" in r.stderr
    r = invoke(["chat", tiny_mlx, "--target", "onnx-cpu"], code=2)
    assert "is an edgec output for mlx" in r.stderr


def test_convert_inspect_parity_and_logits_take_hub_ids(hub, tmp_path):
    """Every command that takes a checkpoint takes the same ids as chat: the snapshot is the source."""
    repo, snap = hub
    r = invoke(["inspect", repo, "--json", "--context", 256])
    assert json.loads(r.stdout)["layout"] == json.loads(invoke(["inspect", snap, "--json", "--context", 256]).stdout)[
        "layout"]
    out = tmp_path / "m-mlx"
    invoke(["convert", f"{repo}@main", "--target", "mlx", "-o", out])
    manifest = json.loads((out / "edgec.json").read_text())
    assert Path(manifest["source"]["path"]).resolve() == snap.resolve()
    invoke(["parity", repo, out, "--positions", 16, "--tokens", 2])
    invoke(["logits", repo, "--ids", "200006,17360", "--out", tmp_path / "l.npy"])
    assert (tmp_path / "l.npy").stat().st_size > 0


def test_original_subfolder_and_missing_ids_for_every_command(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snap = fill_hf_cache(tmp_path / "hf", "edgec-test/both", tiny)  # HF layout at the root, OpenAI's in original/
    assert snapshot("edgec-test/both/original") == (snap / "original", COMMIT)
    r = invoke(["inspect", "edgec-test/both/original", "--json", "--context", 256])
    assert json.loads(r.stdout)["layout"] == "original"
    for args in (["inspect", "openai/gpt-oss-20b"], ["parity", "openai/gpt-oss-20b", tmp_path],
                 ["convert", "openai/gpt-oss-20b", "-t", "mlx", "-o", tmp_path / "o"],
                 ["logits", "openai/gpt-oss-20b", "--ids", "1", "--out", tmp_path / "x.npy"]):
        [line] = invoke(args, code=2).stderr.strip().splitlines()
        assert line.endswith('hf download openai/gpt-oss-20b --exclude "original/*" --exclude "metal/*"'), line
    [line] = invoke(["convert", "openai/gpt-oss-20b/original@v1", "-t", "mlx", "-o", tmp_path / "o"],
                    code=2).stderr.strip().splitlines()
    assert "openai/gpt-oss-20b/original is not in the Hugging Face cache" in line
    assert line.endswith('hf download openai/gpt-oss-20b --include "original/*" --revision v1'), line
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.npy").exists()


def test_serve_takes_hub_ids(hub):
    """`edgec serve ID` resolves like chat: the id's conversion in edgec's cache, answering to the id too."""
    from serving import client, live_server

    repo, _ = hub
    server = live_server(repo, "--target", "mlx")
    url, model_id = next(server)
    try:
        models = [m.id for m in client(url).models.list().data]
        assert repo in models and "mlx" in models  # the id it was started with, and the folder's name
        reply = client(url).chat.completions.create(model=repo, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2)
        assert reply.model == model_id and reply.usage.completion_tokens == 2
    finally:
        server.close()


def test_serve_names_the_download_for_a_missing_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    [line] = invoke(["serve", "openai/gpt-oss-20b"], code=2).stderr.strip().splitlines()
    assert line.endswith('hf download openai/gpt-oss-20b --exclude "original/*" --exclude "metal/*"'), line
