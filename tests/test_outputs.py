"""Never lose data: `--force` never touches the source nor a folder edgec did not write, two writers never share a
destination, a killed run's temporary folder is cleaned by the next, a full disk names the output. Every refusal is
one line, exit 2, with every file left as it was."""

from __future__ import annotations

import errno
import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_ckpt
from test_checkpoint import assert_one_line_error, run
from test_exit_codes import ctrl_c_on

from edgec.errors import EdgecError, Interrupted
from edgec.fsutil import atomic_dir

EDGEC = [sys.executable, "-m", "edgec"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small checkpoint in both layouts (1,024-row vocabulary): cheap to copy per test."""
    return make_ckpt(tmp_path_factory.mktemp("outputs") / "base", num_hidden_layers=2, vocab_size=1024)


@pytest.fixture
def models(base, tmp_path) -> Path:
    """models/src (a checkpoint) and models/other/notes.txt (someone's unrelated file)."""
    shutil.copytree(base, tmp_path / "models" / "src")
    (tmp_path / "models" / "other").mkdir()
    (tmp_path / "models" / "other" / "notes.txt").write_text("mine")
    return tmp_path / "models"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["mlx", "onnx-cpu"])
@pytest.mark.parametrize("src,out,fragment", [
    ("src", "src", "would destroy the source"),  # the output is the source
    ("src", ".", "would destroy the source"),  # the output holds the source and models/other
    ("src/original", "src", "would destroy the source"),  # holds original/ and the tokenizer above it
    ("src", "link", "would destroy the source"),  # a symbolic link to the source
    ("src", "other", "not written by edgec"),  # someone's folder
    ("src", "other/notes.txt", "is a file, not an output folder"),
])
def test_force_never_destroys_the_source_or_foreign_files(models, target, src, out, fragment):
    (models / "link").symlink_to(models / "src")
    before = snapshot(models)
    r = run("convert", str(models / src), "-t", target, "-o", str(models / out), "--force")
    assert_one_line_error(r, fragment)
    assert snapshot(models) == before and not list(models.glob(".*"))


def test_force_foreign_replaces_a_foreign_folder_but_never_the_source(models):
    before = snapshot(models / "src")
    assert_one_line_error(run("convert", str(models / "src"), "-t", "mlx", "-o", str(models),
                              "--force-foreign"), "would destroy the source")
    r = run("convert", str(models / "src"), "-t", "mlx", "-o", str(models / "other"), "--force-foreign")
    assert r.returncode == 0, r.stderr
    assert (models / "other" / "edgec.json").is_file() and not (models / "other" / "notes.txt").exists()
    assert snapshot(models / "src") == before
    with pytest.raises(EdgecError, match="would destroy the source"), \
            atomic_dir(models / "src" / "original", "foreign", keep=[models / "src" / "original" / "config.json"]):
        pass  # the guard itself, as convert and synth call it
    assert snapshot(models / "src") == before


@pytest.mark.parametrize("inside", ["src/original", "src/notes"])
def test_no_force_replaces_a_folder_inside_the_source(models, inside):
    """The source's own original/ folder, or the user's notes kept beside the weights: an existing folder in the
    source's folder that edgec did not write is the user's, whatever --force says; a new folder there is fine, and
    so is replacing it with --force once edgec wrote it."""
    (models / "src" / "notes").mkdir()
    (models / "src" / "notes" / "todo.txt").write_text("mine")
    before = snapshot(models)
    for force in ("--force", "--force-foreign"):
        r = run("convert", str(models / "src"), "-t", "mlx", "-o", str(models / inside), force)
        assert_one_line_error(r, "is inside the source folder")
        assert "and not an edgec output" in r.stderr
    assert snapshot(models) == before
    for force in ([], ["--force"]):  # a new folder there, then that edgec output again
        assert run("convert", str(models / "src"), "-t", "mlx", "-o", str(models / "src" / "new"),
                   *force).returncode == 0


def test_a_folder_that_appears_at_the_output_meanwhile_is_kept(tmp_path):
    """The output's rules are checked again under the lock, just before the rename: a folder someone made at the
    output while edgec wrote is refused (no --force) and kept, and the new output is dropped."""
    out = tmp_path / "out"
    with pytest.raises(EdgecError, match="output folder exists"), atomic_dir(out) as tmp:
        (tmp / "model").write_bytes(b"x")
        out.mkdir()
        (out / "mydata.txt").write_text("precious")
    assert (out / "mydata.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(EdgecError, match="not written by edgec"), atomic_dir(tmp_path / "o2", force=True) as tmp:
        (tmp_path / "o2").mkdir()
        (tmp_path / "o2" / "mine.txt").write_text("mine")
    assert (tmp_path / "o2" / "mine.txt").read_text() == "mine"


def test_a_dangling_link_at_the_output_gets_one_message_with_or_without_force(models):
    (models / "dang").symlink_to(models / "nowhere")
    for force in ([], ["--force"]):
        r = run("convert", str(models / "src"), "-t", "mlx", "-o", str(models / "dang"), *force)
        assert_one_line_error(r, "is a symbolic link, not an output folder")
    assert (models / "dang").is_symlink() and not (models / "nowhere").exists()


def test_a_failed_run_removes_the_parent_folders_it_made(tmp_path):
    with pytest.raises(Interrupted), atomic_dir(tmp_path / "n1" / "n2" / "out"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(Interrupted), atomic_dir(tmp_path / "keep" / "n2" / "out"):
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["keep"] and not list((tmp_path / "keep").iterdir())


def test_logits_never_writes_through_a_link_nor_over_the_models_files(models, tmp_path):
    shard = next((models / "src").glob("*.safetensors"))
    before = snapshot(models)
    (tmp_path / "evil.npy").symlink_to(shard)
    r = run("logits", str(models / "src"), "--ids", "1,2", "--out", str(tmp_path / "evil.npy"))
    assert_one_line_error(r, "symbolic link")
    r = run("logits", str(models / "src"), "--ids", "1,2", "--out", str(models / "src" / "config.json"))
    assert_one_line_error(r, "is a file of the model folder")
    assert snapshot(models) == before
    r = run("logits", str(models / "src"), "--ids", "1,2", "--out", str(tmp_path / "l.bin"))
    assert r.returncode == 0 and "wrote " + str(tmp_path / "l.bin") in r.stderr.replace("\n", "")
    import numpy as np

    assert np.load(tmp_path / "l.bin").shape == (2, 1024)  # the name as given: no .npy appended
    assert not list(tmp_path.glob(".*"))


def test_force_replaces_an_earlier_output_and_an_empty_folder(models):
    out = models / "out"
    out.mkdir()
    for _ in range(2):  # an empty folder, then the edgec output written the first time
        r = run("convert", str(models / "src"), "-t", "mlx", "-o", str(out), "--force")
        assert r.returncode == 0, r.stderr
    assert_one_line_error(run("convert", str(models / "src"), "-t", "mlx", "-o", str(out)), "use --force")
    assert sorted(p.name for p in models.iterdir()) == ["other", "out", "src"]  # no temp or lock files left


def test_synth_force_replaces_only_a_synth_output(tmp_path):
    out = tmp_path / "m"
    args = ["synth", str(out), "--layers", "1", "--vocab", "1024"]
    assert run(*args).returncode == 0 and (out / ".edgec-synth").is_file()
    assert run(*args, "--force").returncode == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert_one_line_error(run("synth", str(tmp_path / "mine"), "--force"), "not written by edgec")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


HOLDER = """
import sys, time
from edgec.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "big").write_bytes(b"x" * 3_000_000)
    print("ready", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_killed_ones_temp_folder_is_cleaned(base, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert_one_line_error(run("convert", str(base), "-t", "mlx", "-o", str(out)),
                              "another edgec process is writing this output")
        assert_one_line_error(run("synth", str(out)), "another edgec process is writing this output")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stale = list(tmp_path.glob(".out.edgec-tmp-*"))
    assert len(stale) == 1 and (stale[0] / "big").is_file()  # what SIGKILL leaves behind
    look_alike = tmp_path / ".out.edgec-tmp-notours"  # not recorded by edgec: left alone
    look_alike.mkdir()
    r = run("convert", str(base), "-t", "mlx", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"removed {stale[0]} (3.0 MB), left by an edgec run that was killed" in r.stderr
    assert not stale[0].exists() and look_alike.is_dir() and (out / "edgec.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.edgec-tmp-notours", "out"]


def test_a_full_disk_names_the_output_not_the_source(base, tmp_path, monkeypatch):
    import edgec.convert.common as common
    from edgec.convert import run_convert

    def full(src, dst):  # what shutil.copyfile raised on a full disk: the error names the source
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(common.shutil, "copyfile", full)
    out = tmp_path / "small"
    with pytest.raises(EdgecError) as e:
        run_convert(base, "mlx", out, progress=False)
    assert str(e.value) == f"{out}: disk full while writing the output; no partial output was left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(EdgecError, match=f"^{out}/model.safetensors: disk full"), atomic_dir(out) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))


def test_an_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(Interrupted) as e, atomic_dir(tmp_path / "out") as tmp:
        (tmp / "partial").write_bytes(b"x")
        raise KeyboardInterrupt
    assert e.value.exit_code == 130 and "no partial output was left behind" in str(e.value)
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_a_library_swallowed_still_leaves_nothing(tmp_path, sig):
    """Cython's generated module init swallows a KeyboardInterrupt raised while it imports (a bare `except: pass`):
    a Ctrl-C landing while numpy.random was first imported mid-synth let the run finish and exit 0."""
    with pytest.raises(Interrupted), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "partial").write_bytes(b"x")
        try:
            signal.raise_signal(sig)
        except KeyboardInterrupt:  # what the library does
            pass
        (tmp / "rest").write_bytes(b"y")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_mid_conversion_exit_130(tmp_path, sig):
    """A real conversion, signalled once its temporary folder exists."""
    src = tmp_path / "src"
    make_ckpt(src, "small", layout="hf", num_hidden_layers=8)  # ~0.2 GB: converting takes a few seconds
    out = tmp_path / "out"
    proc = subprocess.Popen(EDGEC + ["convert", str(src), "-t", "onnx-cpu", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_on)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.edgec-tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; no partial output was left behind" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_writing_needs_no_fcntl(base, tmp_path):
    """Windows has no fcntl: the destination lock takes msvcrt there, and nothing else needs either."""
    out = tmp_path / "out"
    code = ("import sys; sys.modules['fcntl'] = None; from edgec.__main__ import run; "
            f"sys.argv = ['edgec', 'convert', {str(base)!r}, '-t', 'mlx', '-o', {str(out)!r}]; run()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and (out / "edgec.json").is_file(), r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupt_while_the_old_output_is_removed_is_told_and_cleaned_next_time(tmp_path, monkeypatch):
    """Ctrl-C after the new output took the old one's place, while the old one is deleted: the run says so (exit
    130), the lock file keeps the old one's name, and the next run removes what is left and says so."""
    import edgec.fsutil as fsutil

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "edgec.json").write_text("{}")
    real = shutil.rmtree

    def interrupted(p, *a, **k):
        if ".edgec-old-" in str(p):
            (Path(p) / "edgec.json").unlink()  # partly removed
            raise KeyboardInterrupt
        return real(p, *a, **k)

    monkeypatch.setattr(fsutil.shutil, "rmtree", interrupted)
    with pytest.raises(Interrupted, match="interrupted after the new output was in place") as e, \
            atomic_dir(out, force=True) as tmp:
        (tmp / "edgec.json").write_text('{"new": 1}')
    assert e.value.exit_code == 130 and (out / "edgec.json").read_text() == '{"new": 1}'
    assert len(list(tmp_path.glob(".out.edgec-old-*"))) == 1 and (tmp_path / ".out.edgec-lock").is_file()
    monkeypatch.setattr(fsutil.shutil, "rmtree", real)
    with atomic_dir(out, force=True) as tmp:
        (tmp / "edgec.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
