"""Pipeline-parallel MLX (edgec/runtime/pipeline.py) on loopback ranks started by mlx.launch (ring backend).

Exactness: the logits of 2 and 3 ranks equal the single-process MlxBackend's bit for bit (np.array_equal, no
tolerance): each layer runs the same MLX ops on the same chunks; only the process differs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")  # the MLX extra: installed in CI (mlx[cpu])

from edgec.runtime.mlx_backend import MlxBackend
from edgec.runtime.pipeline import launch_command, split_layers

HERE = Path(__file__).parent
ENV = dict(os.environ, PYTHONPATH=str(HERE.parent))
sys.path.insert(0, str(HERE))
from pipeline_ranks import drive  # noqa: E402


def hostfile(tmp: Path, n: int, budgets: list[str] | None = None) -> Path:
    p = tmp / f"hosts{n}.json"
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]} for _ in range(n)]
    for h, b in zip(hosts, budgets or [], strict=False):
        h["memory_budget"] = b
    p.write_text(json.dumps({"hosts": hosts}))
    return p


def launch(tmp: Path, folder: Path, n: int, port: int, timeout: float = 240, env: dict | None = None,
           script_args: tuple = ()) -> subprocess.CompletedProcess:
    hosts = hostfile(tmp, n)
    cmd = launch_command(hosts, "ring", [])[:-3]  # mlx.launch ... -- ; then the rank script
    cmd += ["--starting-port", str(port), "--", str(HERE / "pipeline_ranks.py"), str(folder),
            str(tmp / f"p{n}.npz"), str(hosts), *map(str, script_args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(HERE.parent), **(env or {})))


def single(folder: Path, *script_args: int) -> list[np.ndarray]:
    b = MlxBackend(folder, max_context=1024, compute="float32", kv_dtype="float32")
    b.PREFILL_CHUNK = 64
    ids = [int(v) for v in np.random.default_rng(0).integers(0, b.config.vocab_size, 600)]
    return drive(b, ids, *script_args)


@pytest.mark.parametrize("ranks,port", [(2, 35100), (3, 35200)])
def test_pipeline_logits_bit_identical(tiny_mlx, tmp_path, ranks, port):
    r = launch(tmp_path, tiny_mlx, ranks, port)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.load(tmp_path / f"p{ranks}.npz")
    layers = got["layers"]
    assert len(layers) == ranks and layers[0][0] == 0 and layers[-1][1] == 3  # every layer placed, in order
    want = single(tiny_mlx)
    assert len(got.files) - 1 == len(want)
    for i, w in enumerate(want):
        assert np.array_equal(got[f"arr_{i}"], w), f"step {i}: logits differ"


def test_split_by_memory():
    # rank 0 holds the 10-byte head: with equal budgets it takes fewer layers
    assert split_layers([10] * 6, 20, [100, 100]) == [range(0, 2), range(2, 6)]
    # a host with twice the budget takes about twice the layers
    assert split_layers([10] * 9, 0, [100, 50]) == [range(0, 6), range(6, 9)]
    with pytest.raises(Exception, match="does not fit"):
        split_layers([60] * 4, 0, [100, 100])


def test_killed_rank_is_one_line_on_rank_0(tiny_mlx, tmp_path):
    """Rank 1 dies (SIGKILL): mlx.launch ends rank 0, which says so in one line instead of hanging."""
    r = launch(tmp_path, tiny_mlx, 2, 35300, timeout=60, env={"EDGEC_TEST_DIE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: rank 0 (127.0.0.1) stopped: another rank of the pipeline exited (mlx.launch's [WARN] "
                     "line names it)"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_silent_rank_times_out_naming_the_host(tiny_mlx, tmp_path):
    """Rank 1 is alive but never answers (sleeps): rank 0's watchdog ends the wait in one line."""
    r = launch(tmp_path, tiny_mlx, 2, 35400, timeout=60, env={"EDGEC_TEST_HANG": "1", "EDGEC_PIPELINE_TIMEOUT": "3"})
    assert "error: rank 1 (127.0.0.1) did not answer within 3 s; is it running and reachable?" in r.stderr, \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def generate_both(folder: Path, tmp: Path, tokens: int, hosts: Path | None = None) -> tuple[dict, dict]:
    """`edgec generate` greedy in one process and across 2 loopback ranks (--hosts, re-run under mlx.launch)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    args = [sys.executable, "-m", "edgec", "generate", str(folder), "--prompt", "hi", "--temperature", "0",
            "--max-tokens", str(tokens), "--json", "--compute", "float32"]
    one = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run(args + ["--hosts", str(hosts or hostfile(tmp, 2))], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-1000:] + two.stderr[-2000:]
    return json.loads(one.stdout), json.loads(two.stdout)


def test_generate_cli_same_tokens(tiny_mlx, tmp_path):
    """`edgec generate --hosts` (re-run under mlx.launch) gives the single process's tokens, greedy; the split it
    prints is the one `edgec inspect --hosts` showed before launching, from the hosts' memory_budget: rank 1's
    1 MB holds one of tiny's layers (about 0.5 MB with its KV at 4096), not two, so rank 0 takes two."""
    hosts = hostfile(tmp_path, 2, ["1GB", "1MB"])
    a, b = generate_both(tiny_mlx, tmp_path, 6, hosts)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 6
    assert "per token: 2 hops" in b["memory"]
    shown = subprocess.run([sys.executable, "-m", "edgec", "inspect", str(tiny_mlx), "--hosts", str(hosts)],
                           capture_output=True, text=True, timeout=60, env=ENV)
    assert shown.returncode == 0, shown.stderr
    lines = [ln.replace(" (hosts file)", "") for ln in shown.stdout.splitlines()]
    assert lines == ["context 4096", *b["memory"].splitlines()]
    assert "layers 0-1," in lines[1] and "layers 2-2," in lines[2]


def test_inspect_hosts_needs_a_remote_budget(tiny_mlx, tmp_path):
    """A host that is not this machine and has no memory_budget: one line naming the field, exit 2."""
    p = tmp_path / "h.json"
    p.write_text(json.dumps([{"ssh": "127.0.0.1"}, {"ssh": "mac2.example", "ips": ["10.0.0.2"]}]))
    r = subprocess.run([sys.executable, "-m", "edgec", "inspect", str(tiny_mlx), "--hosts", str(p)],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{p}: hosts[1].memory_budget: needed for 10.0.0.2" in r.stderr


def test_120b_slice_two_ranks(slice120_mlx, tmp_path):
    """The 120b shapes (hidden 2880, 128 experts, 64 q / 8 kv heads, 201088 vocab, window 128), 2 layers (one
    sliding, one full) on 2 ranks: bit-identical logits through prefill past the window, decode, rollback and
    reset, and `edgec generate`'s tokens. (About 3 minutes here, 2 cores; the slice is 5.8 GB, written once.)"""
    r = launch(tmp_path, slice120_mlx, 2, 35500, timeout=400, script_args=(140, 8))
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.load(tmp_path / "p2.npz")
    assert got["layers"].tolist() == [[0, 1], [1, 2]]
    want = single(slice120_mlx, 140, 8)
    assert len(got.files) - 1 == len(want)
    for i, w in enumerate(want):
        assert np.array_equal(got[f"arr_{i}"], w), f"step {i}: logits differ"
    a, b = generate_both(slice120_mlx, tmp_path, 3)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 3


def test_serve_two_ranks_openai_client_and_ctrl_c(tiny_mlx, tmp_path):
    """`edgec serve --hosts` on 2 loopback ranks: rank 0 answers the openai client with the single process's greedy
    tokens (the one Generator over the pipeline backend); Ctrl-C (SIGINT to the terminal's process group) ends
    every rank."""
    import signal

    openai = pytest.importorskip("openai")  # the serve extra's test dependency
    from serving import free_port, wait_ready

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgec", "serve", str(tiny_mlx), "--port", str(port),
                             "--max-context", "1024", "--temperature", "0", "--compute", "float32",
                             "--hosts", str(hostfile(tmp_path, 2))],
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        r = c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=6, temperature=0,
                                      messages=[{"role": "user", "content": "hi"}])
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    err = proc.stderr.read()
    assert r.usage.completion_tokens == 6, err[-2000:]
    assert proc.returncode == 130, (proc.returncode, err[-2000:])  # as single-process serve after Ctrl-C
    one = subprocess.run([sys.executable, "-m", "edgec", "generate", str(tiny_mlx), "--prompt", "hi",
                          "--temperature", "0", "--max-tokens", "6", "--json", "--compute", "float32",
                          "--max-context", "1024"], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.choices[0].message.content == json.loads(one.stdout)["messages"][-1]["text"]
    assert "Traceback" not in err
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"ranks still running: {left}"


def rank_pids(pgid: int, rank: str) -> list[int]:
    """The processes of a process group that run an MLX rank (MLX_RANK in their environment)."""
    out = []
    for pid in subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
            out.append(int(pid))
    return out


def test_chat_keeps_the_conversation_when_a_rank_dies(tiny_mlx, tmp_path):
    """`edgec chat --hosts`: after a turn, rank 1 is killed; rank 0 says so in one line, writes the conversation to
    a new file that /load reads back, exits 130, and no rank is left running."""
    import signal
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgec", "chat", str(tiny_mlx), "--max-tokens", "4",
                             "--temperature", "0", "--compute", "float32", "--max-context", "1024",
                             "--hosts", str(hostfile(tmp_path, 2))], cwd=tmp_path, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen = threading.Event()
    out: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("last turn:"):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        proc.stdin.write("hello there\n/stats\n")
        proc.stdin.flush()
        assert seen.wait(240), "".join(out)
        ranks = rank_pids(proc.pid, "1")
        assert ranks, "rank 1 not found"
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "rank 0 (127.0.0.1) stopped: another rank" in lines[0], err[-2000:]
    saved = sorted(tmp_path.glob("edgec-chat-*.json"))
    assert len(saved) == 1 and str(saved[0]) in lines[0]
    from edgec.harmony.conversation import Conversation

    roles = [m.role for m in Conversation.load(saved[0]).messages]  # what /load reads
    assert "user" in roles and "assistant" in roles and "hello there" in saved[0].read_text()
    time.sleep(1)
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout == b""
    assert "Traceback" not in err


def test_sigterm_to_edgec_ends_every_rank(tiny_mlx, tmp_path):
    """SIGTERM to the `edgec generate --hosts` the user started (it re-ran itself under mlx.launch) reaches the
    ranks: it exits 130 and leaves none running (mlx.launch alone would die at once and orphan them)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgec", "generate", str(tiny_mlx), "--prompt", "hi",
                             "--max-tokens", "100000", "--max-context", "100000", "--compute", "float32",
                             "--hosts", str(hostfile(tmp_path, 2))], env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for _ in range(240):  # both ranks up
            if rank_pids(proc.pid, "1") and rank_pids(proc.pid, "0"):
                break
            time.sleep(0.5)
        time.sleep(3)  # past loading, into generation
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    time.sleep(1)
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout == b"", err[-2000:]
    assert "Traceback" not in err
