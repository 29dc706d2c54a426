"""Pipeline-parallel MLX over mlx.distributed: each rank holds a contiguous slice of the layers and their KV cache.

Launch (mlx's own launcher; edgec writes no transport):
    edgec generate OUT --hosts hosts.json ...     re-executes itself as `mlx.launch --hostfile hosts.json
                                                  --backend ring -- -m edgec generate OUT --hosts hosts.json ...`
Inside the launch (MLX_RANK set) rank 0 is the ordinary generation loop (`Generator`, chat, serve); it calls this
backend's `forward` / `truncate` / `reset` like any other. The other ranks run `serve_stage`: they do what rank 0
tells them, nothing else.

Placement: rank 0 holds the embedding, the final norm and lm_head beside its first layers. The sampler runs where
the user is, so the logits (vocab floats, 800 KB per position) never cross a link; the hidden vector comes back
from the last rank instead (one more 2,880-float hop per token). Every chunk travels the ring
0 -> 1 -> ... -> R-1 -> 0 (mlx's ring backend sends to neighbours): a 4-int header, the chunk's ids, one
[n, hidden] float32 activation per boundary. reset / truncate travel as headers alone.

Bit-identical to one process: every layer runs the same MLX ops in the same order on the same chunks (the loop's
PREFILL_CHUNK); only where they run differs. Split: by memory (`split_layers`), each rank's budget from the one
memory model (`memory.device_budget`), gathered from every rank before loading; the manifest's sha256 of every
weight file is compared across ranks first, so different files on two hosts are refused before anything loads.
Faults: rank 0 waits for an answer at most `timeout` seconds (a watchdog), then prints one line naming the host
and exits 2; mlx.launch terminates the other ranks when one exits with an error (Ctrl-C on rank 0 included).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgecError, require
from ..jsonio import load_json, read_json
from ..spec import GptOssConfig
from .mlx_backend import MlxBackend

RUN, RESET, TRUNCATE, STOP = 1, 2, 3, 4
LOGITS = {"none": 0, "last": 1, "all": 2}
TIMEOUT = float(os.environ.get("EDGEC_PIPELINE_TIMEOUT", 120))  # seconds rank 0 waits for one chunk to come back


def read_hosts(path: str | Path) -> list[dict[str, Any]]:
    """The hosts of mlx.launch's hostfile (a list, or {"hosts": [...]}); each needs "ssh"."""
    data = read_json(Path(path))
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, dict) and isinstance(h.get("ssh"), str)
                                                           for h in hosts):
        raise EdgecError(f"{path}: hosts: needs a list of {{\"ssh\": ..., \"ips\": [...]}} (mlx.launch's hostfile)")
    return hosts


def host_name(h: dict[str, Any]) -> str:
    return ",".join(h.get("ips") or []) or h["ssh"]


def host_budget(hosts: list[dict[str, Any]], k: int, where: str | Path) -> int | None:
    """Host k's "memory_budget" in the hosts file (an edgec key beside mlx.launch's; '48GB'), None if absent."""
    from ..memory import parse_size

    text = hosts[k].get("memory_budget")
    if text is None:
        return None
    try:
        return parse_size(text)
    except EdgecError:
        raise EdgecError(f"{where}: hosts[{k}].memory_budget: {text!r} is not a size such as 48GB") from None


def planned_budgets(hosts: list[dict[str, Any]], where: str | Path) -> list[tuple[int, str]]:
    """(bytes, source) per host without launching: the hosts file's memory_budget; else, for a host that is this
    machine, the budget measured here; a remote host without one is refused (it can't be measured from here)."""
    import socket

    from ..memory import available_ram

    local = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    out = []
    for k, h in enumerate(hosts):
        if (b := host_budget(hosts, k, where)) is not None:
            out.append((b, "hosts file"))
            continue
        if h["ssh"] not in local:
            raise EdgecError(f"{where}: hosts[{k}].memory_budget: needed for {host_name(h)} (\"48GB\"): edgec "
                             "measures only this machine without launching")
        try:
            m = MlxBackend.budget(MlxBackend.defaults(None))
        except EdgecError:  # no MLX here: available RAM
            m = available_ram()
        out.append((m.bytes or 0, f"{m.source} here"))
    return out


def layer_bytes(folder: Path, cfg: GptOssConfig) -> tuple[list[int], int]:
    """Bytes of each layer's tensors and of the rest (embedding, final norm, lm_head), from the safetensors headers."""
    from ..safetensors_io import SafetensorsFile

    per, rest = [0] * cfg.num_hidden_layers, 0
    for f in sorted(Path(folder).glob("model*.safetensors")):
        for name, e in SafetensorsFile(f).entries.items():
            n = e["offsets"][1] - e["offsets"][0]
            if name.startswith("model.layers."):
                per[int(name.split(".")[2])] += n
            else:
                rest += n
    return per, rest


def split_layers(layers: list[int], head: int, budgets: list[int]) -> list[range]:
    """Contiguous layer ranges, one per rank (rank 0 also holds `head` bytes), that equalise the fraction of each
    budget used: the smallest fraction f for which filling ranks in order up to f * budget places every layer, each
    rank at least one layer. EdgecError when even f = 1 does not."""
    n, r = len(layers), len(budgets)
    if r > n:
        raise EdgecError(f"{r} ranks for {n} layers: every rank needs at least one layer")

    def fill(f: float) -> list[range] | None:
        out, i = [], 0
        for k, b in enumerate(budgets):
            used, j = head if k == 0 else 0, i
            cap = f * b
            while j < n and (j == i or used + layers[j] <= cap) and n - (j + 1) >= r - k - 1:
                if j > i and used + layers[j] > cap:
                    break
                used += layers[j]
                j += 1
            if used > cap and f >= 1:
                return None
            out.append(range(i, j))
            i = j
        return out if i == n else None

    if fill(1.0) is None:
        raise EdgecError(f"the model ({sum(layers) + head} bytes) does not fit these hosts' budgets {budgets}")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return fill(hi)


def plan(folder: Path, budgets: list[int], context: int, kv_per_layer: int | None = None) -> dict[str, Any]:
    """The split and what it costs: layers, weight and KV bytes per rank, bytes sent per generated token."""
    cfg = GptOssConfig.from_hf(load_json(Path(folder) / "config.json"), str(Path(folder) / "config.json"))
    per, head = layer_bytes(folder, cfg)
    if not any(per):
        raise EdgecError(f"{folder}: no model.layers.* tensors in model*.safetensors; --hosts plans an MLX folder "
                         "(edgec convert -t mlx)")
    if kv_per_layer is None:
        full, sliding = MlxBackend.kv_positions(cfg, context)
        pos = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16 K and V
        kv = [pos * (sliding if cfg.is_sliding(i) else full) for i in range(cfg.num_hidden_layers)]
    else:
        kv = [kv_per_layer] * cfg.num_hidden_layers
    ranges = split_layers([w + k for w, k in zip(per, kv, strict=True)], head, budgets)
    header = 4 * 4 + 4  # int32 header and one token id per hop
    act = cfg.hidden_size * 4
    ranks = [{"rank": k, "layers": [r.start, r.stop], "weights": sum(per[i] for i in r) + (head if k == 0 else 0),
              "kv": sum(kv[i] for i in r), "budget": budgets[k]} for k, r in enumerate(ranges)]
    hops = len(budgets) if len(budgets) > 1 else 0
    return {"ranks": ranks, "hops_per_token": hops, "bytes_per_token": hops * (act + header),
            "activation_bytes": act}


def weights_digest(folder: Path) -> str:
    """sha256 over the manifest's recorded sha256 of every file (edgec.json), the identity two hosts must share."""
    m = load_json(Path(folder) / "edgec.json")
    files = m.get("files") or {}
    return hashlib.sha256(json.dumps({k: v.get("sha256") for k, v in files.items()}, sort_keys=True).encode()
                          ).hexdigest()


class PipelineBackend(MlxBackend):
    """One rank's stage. Rank 0 is the backend the loop drives; others call `serve_stage`."""

    def __init__(self, folder: str | Path, hosts: list[dict[str, Any]], group: Any = None,
                 timeout: float | None = None, **options: Any):
        mx = require("mlx.core", "mlx")
        rank = int(os.environ.get("MLX_RANK", 0))
        on_sigterm(f"rank {rank} ({host_name(hosts[rank % len(hosts)])})")  # before mlx starts its threads
        self.group = group or mx.distributed.init(strict=True)
        self.rank, self.size = self.group.rank(), self.group.size()
        self.hosts, self.timeout = hosts, timeout or TIMEOUT
        if self.size != len(hosts):
            raise EdgecError(f"{self.size} ranks running, the hosts file names {len(hosts)}")
        folder = Path(folder)
        digests = self._gather_bytes(bytes.fromhex(weights_digest(folder)))
        bad = [host_name(hosts[k]) for k, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise EdgecError(f"{folder}: model files on {', '.join(bad)} differ from {host_name(hosts[0])}'s "
                             "(sha256 in edgec.json); copy the same folder to every host")
        override = host_budget(hosts, self.rank, "hosts file")
        budget = MlxBackend.budget({**MlxBackend.defaults(folder), **options}, override).bytes or 0
        budgets = [int(b) for b in self._gather_bytes(np.int64(budget).tobytes(), decode=np.int64)]
        self.plan_ = plan(folder, budgets, options.get("max_context") or 4096)
        self.stage = range(*self.plan_["ranks"][self.rank]["layers"])
        self.prev, self.next = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self._ready = False
        super().__init__(folder, **options)
        self._ready = True

    # ---- placement ---------------------------------------------------------------------------------------
    def layers(self) -> range:
        return self.stage

    def _holds(self, name: str) -> bool:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.stage
        return self.rank == 0

    # ---- the wire ----------------------------------------------------------------------------------------
    def _gather_bytes(self, b: bytes, decode: Any = None) -> list:
        mx = self.mx if hasattr(self, "mx") else require("mlx.core", "mlx")
        with mx.stream(mx.cpu):
            a = mx.distributed.all_gather(mx.array(np.frombuffer(b, dtype=np.uint8))[None], group=self.group)
            rows = np.array(a).reshape(self.size, -1)
        return [r.view(decode)[0] if decode else r.tobytes() for r in rows]

    def _send(self, a: Any) -> None:
        mx = self.mx
        with mx.stream(mx.cpu):
            mx.eval(mx.distributed.send(a, self.next, group=self.group))

    def _recv(self, shape: tuple, dtype: Any) -> Any:
        mx = self.mx
        if self.rank != 0:
            with mx.stream(mx.cpu):
                a = mx.distributed.recv(shape, dtype, self.prev, group=self.group)
                mx.eval(a)
            return a
        done = threading.Event()
        host = host_name(self.hosts[self.prev])

        def watchdog() -> None:  # mlx's recv blocks: a silent ring ends rank 0 with one line, not a hang
            if not done.wait(self.timeout):
                sys.stderr.write(f"error: rank {self.prev} ({host}) did not answer within {self.timeout:g} s; "
                                 "is it running and reachable?\n")
                sys.stderr.flush()
                status(2)
                os._exit(2)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            with mx.stream(mx.cpu):
                a = mx.distributed.recv(shape, dtype, self.prev, group=self.group)
                mx.eval(a)
        except RuntimeError as e:
            raise EdgecError(f"rank {self.prev} ({host}): {e}") from None
        finally:
            done.set()
        return a

    def _header(self, op: int, a: int = 0, b: int = 0) -> None:
        self._send(self.mx.array([op, a, b, 0], dtype=self.mx.int32))

    # ---- rank 0: the backend the loop drives -------------------------------------------------------------
    def reset(self) -> None:
        if getattr(self, "_ready", False) and self.rank == 0 and self.size > 1:
            self._header(RESET)
        super().reset()

    def truncate(self, n: int) -> None:
        super().truncate(n)  # may reset and re-run (sent as RESET and RUN)
        if self.rank == 0 and self.size > 1:
            self._header(TRUNCATE, self.length)

    def _run(self, ids: list[int], logits: str) -> np.ndarray | None:
        mx = self.mx
        if self.size == 1:
            return super()._run(ids, logits)
        self._header(RUN, len(ids), LOGITS[logits])
        self._send(mx.array(ids, dtype=mx.int32))
        with mx.stream(self.dev):
            x = self._blocks(self._embed(mx.array(ids)), self.stage)
            mx.eval(x, self._cache_arrays())
        self._send(x)
        x = self._recv(x.shape, mx.float32)
        self.ids.extend(ids)
        with mx.stream(self.dev):
            return self._head(x, logits)

    def close(self) -> None:
        if self.rank == 0 and self.size > 1:
            self._header(STOP)

    # ---- ranks 1..: serve the stage ----------------------------------------------------------------------
    def serve_stage(self) -> None:
        mx = self.mx
        last = self.next == 0
        while True:
            op, n, _, _ = (int(v) for v in np.array(self._recv((4,), mx.int32)))
            if not last:
                self._header(op, n)
            if op == STOP:
                return
            if op == RESET:
                MlxBackend.reset(self)
            elif op == TRUNCATE:
                del self.ids[n:]
            elif op == RUN:
                ids = [int(v) for v in np.array(self._recv((n,), mx.int32))]
                if not last:
                    self._send(mx.array(ids, dtype=mx.int32))
                x = self._recv((n, self.config.hidden_size), mx.float32)
                with mx.stream(self.dev):
                    x = self._blocks(x, self.stage)
                    mx.eval(x, self._cache_arrays())
                self.ids.extend(ids)
                self._send(x)


def launch_command(hostfile: Path, backend: str, argv: list[str]) -> list[str]:
    """mlx.launch re-running this edgec command on every host (the same argv, run as `python -m edgec`)."""
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "--hostfile",
            str(hostfile), "--backend", backend, "--python", sys.executable, "--", "-m", "edgec", *argv]


def open_stage(model: Path, hosts_file: Path, backend: str, max_context: int | None, say: Any = None,
               options: dict[str, Any] | None = None):
    """--hosts: outside mlx.launch, re-run this command under it and exit with its status; inside, open this
    rank's stage: rank 0 returns (backend, context) to the loop, the other ranks serve until rank 0 stops."""
    import atexit

    hosts = read_hosts(hosts_file)
    if "MLX_RANK" not in os.environ:
        sys.exit(relaunch(hosts_file, backend))
    context = max_context or 4096
    given = {k: v for k, v in (options or {}).items() if v is not None}
    b = PipelineBackend(model, hosts, max_context=context, **given)
    if b.rank != 0:
        b.serve_stage()
        sys.exit(0)
    atexit.register(b.close)
    (say or (lambda m: sys.stderr.write(m + "\n")))(describe(b.plan_, hosts))
    return b, context


def serve_ranks(hosts_file: Path, backend: str, open_session: Any) -> None:
    """serve --hosts, on the main thread before the server starts: outside mlx.launch, re-run under it and exit
    with its status; ranks 1.. open their stage here and serve it until rank 0 stops (`open_session` leads to
    `open_stage`, which never returns there); rank 0 returns, to serve HTTP (its engine opens the session)."""
    read_hosts(hosts_file)
    if "MLX_RANK" not in os.environ:
        sys.exit(relaunch(hosts_file, backend))
    if os.environ["MLX_RANK"] != "0":
        open_session()
        sys.exit(0)


def relaunch(hosts_file: Path, backend: str) -> int:
    """Run this command under mlx.launch; its exit status is rank 0's (mlx.launch itself exits 0 when a rank
    failed), read from the file rank 0 writes, 1 when rank 0 wrote none (it died)."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rc_file = Path(d) / "rc"
        cmd = launch_command(hosts_file, backend, sys.argv[1:])
        cmd[cmd.index("--"):cmd.index("--")] = ["--env", f"EDGEC_PIPELINE_RC={rc_file}"]
        proc = None
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the group:
        try:  # mlx.launch and ranks 1.. inherit the ignore; rank 0 takes it back (recording) and ends the launch
            proc = subprocess.Popen(cmd)
            term = signal.signal(signal.SIGTERM, lambda *_: end_ranks(proc.pid))
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGINT, interrupt)
            if proc is not None:
                signal.signal(signal.SIGTERM, term)
        return int(rc_file.read_text()) if rc_file.is_file() else rc or 1


def end_ranks(launcher: int) -> None:
    """SIGTERM to `relaunch`: passed to mlx.launch's children (the local ranks, or ssh to the remote ones), which end
    in one line and exit 130, and mlx.launch after them; mlx.launch itself would die at once and leave them running."""
    import signal
    import subprocess

    kids = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)


def recording(main: Any) -> None:
    """A rank's CLI under `relaunch`: rank 0 takes Ctrl-C back (relaunch ignored it for mlx.launch and every rank,
    so a terminal's Ctrl-C to the group reaches rank 0 alone, which ends the launch) and records its exit status."""
    import signal

    if os.environ.get("MLX_RANK") == "0":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except SystemExit as e:
        status(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise
    status(0)


def status(code: int) -> None:
    """Rank 0 records its exit status for `relaunch` (first record wins)."""
    p = os.environ.get("EDGEC_PIPELINE_RC")
    if p and os.environ.get("MLX_RANK") == "0" and not Path(p).exists():
        Path(p).write_text(str(code))


ON_DOWN: list[Any] = []  # rank 0's last words when another rank ends it: callables -> a phrase (chat saves)


def last_words() -> str:
    out = ""
    for f in ON_DOWN:
        try:
            out += f"; {f()}"
        except Exception as e:  # the exit line must still be said
            out += f"; {e}"
    return out


def on_sigterm(who: str) -> None:
    """mlx.launch ends every rank with SIGTERM when one exits with an error. The main thread may sit in mlx's
    blocking recv, where no Python handler runs, so the signal's wakeup byte is read by a thread: one line, exit
    130."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return  # serve's rank 0 opens the model on its worker thread; uvicorn handles SIGTERM (exit 130)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(w)

    def wait() -> None:
        while os.read(r, 1)[0] != signal.SIGTERM:
            pass  # another signal's wakeup byte (Ctrl-C is the main thread's)
        sys.stderr.write(f"error: {who} stopped: another rank of the pipeline exited (mlx.launch's [WARN] line "
                         f"names it){last_words()}\n")
        sys.stderr.flush()
        status(130)
        os._exit(130)

    threading.Thread(target=wait, daemon=True).start()


def describe(p: dict[str, Any], hosts: list[dict[str, Any]]) -> str:
    """The plan in a few lines: each rank's layers and bytes, and the traffic per generated token."""
    from ..memory import gib

    lines = [f"rank {r['rank']} ({host_name(hosts[r['rank']])}): layers {r['layers'][0]}-{r['layers'][1] - 1}, "
             f"weights {gib(r['weights'])}, KV {gib(r['kv'])} of {gib(r['budget'])}"
             f"{' (' + r['budget_source'] + ')' if r.get('budget_source') else ''}"
             f"{' + embedding, lm_head' if r['rank'] == 0 else ''}" for r in p["ranks"]]
    lines.append(f"per token: {p['hops_per_token']} hops of {p['activation_bytes']} bytes "
                 f"({p['bytes_per_token']} bytes with headers)")
    return "\n".join(lines)
