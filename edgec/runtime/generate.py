"""The one generation loop for every backend: prompt reuse, sampling, stop tokens, streaming, statistics.

`Generator(backend)` remembers which token ids the backend's KV cache holds. Each call finds the longest common
prefix of the new prompt and those ids, rolls the cache back to it (`backend.truncate`), prefills only the rest
and then samples one token at a time until `<|return|>` / `<|call|>`, `max_tokens` or the end of the context.
The stop token itself is not fed to the cache (Harmony stores a finished reply with `<|end|>` in its place).
With a `Guard` (constrain.py) only the tokens it allows are sampled (as if the others' logits were -inf); the mask
for the next step is computed in a worker thread while the backend runs the forward of this one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EdgecError
from ..harmony.render import RETURN, STOP_TOKENS
from .base import Backend

if TYPE_CHECKING:
    from .constrain import Guard

NUCLEUS_CANDIDATES = 1024  # top-p looks at this many best tokens first and sorts the whole vocabulary only if needed


@dataclass
class Sampling:
    """Sampling settings. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise EdgecError(f"--temperature must be a finite number >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise EdgecError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise EdgecError(f"--top-k must be >= 0 (got {self.top_k})")
        if self.max_tokens < 1:
            raise EdgecError(f"--max-tokens must be >= 1 (got {self.max_tokens})")


def next_token_probs(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The distribution a token is drawn from: temperature, then top-k, then top-p (nucleus), renormalised.

    Returns float64 probabilities over the vocabulary (zeros outside the kept set). At temperature 0 it is
    one-hot on the argmax (the first one on ties). top-k keeps every token tied with the k-th best. top-p keeps the
    smallest set of best tokens whose mass reaches top_p.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if s.temperature == 0:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / s.temperature
    if 0 < s.top_k < z.size:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        n = min(NUCLEUS_CANDIDATES, p.size)
        cand = np.argpartition(-p, n - 1)[:n] if n < p.size else np.arange(p.size)
        if p[cand].sum() < s.top_p:  # the nucleus is wider than the candidates: sort everything
            cand = np.arange(p.size)
        order = cand[np.argsort(-p[cand], kind="stable")]
        before = np.cumsum(p[order]) - p[order]  # mass of the strictly better tokens
        keep = order[before < s.top_p]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return p


class Sampler:
    """Draws token ids; a seed makes the whole sequence of draws reproducible."""

    def __init__(self, s: Sampling):
        self.s = s
        self.rng = np.random.default_rng(s.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.temperature == 0:
            return int(np.argmax(logits))
        p = next_token_probs(logits, self.s)
        c = np.cumsum(p)
        return int(min(np.searchsorted(c, self.rng.random() * c[-1], side="right"), p.size - 1))


def sample_allowed(sample: Sampler, logits: np.ndarray, allowed: np.ndarray | None) -> int:
    """Draw among the tokens a constraint allows: the same distribution as setting the others' logits to -inf
    (temperature, top-k and top-p then see only the allowed tokens), computed over the allowed ids alone, which is
    faster than the whole vocabulary when the constraint is narrow. Ids past the mask's vocabulary are never drawn."""
    if allowed is None:
        return sample(logits)
    ids = np.flatnonzero(allowed[:logits.size])
    if ids.size == 0:
        raise EdgecError("constraint: no token is allowed here")
    return int(ids[sample(logits[ids])])


_MASKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgec-mask")  # masks overlap the forward


@dataclass
class Stats:
    """One generation: prompt tokens, how many came from the cache, how many were prefilled and decoded."""

    prompt: int = 0
    reused: int = 0
    prefill: int = 0
    decode: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0  # call -> first sampled token (includes the prefill)
    stop: str = ""  # return | call | max_tokens | context | interrupted
    kv_bytes: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def tok_s(self) -> float:
        """Decode speed: tokens sampled after the first one, over the time spent producing them."""
        return (self.decode - 1) / self.decode_s if self.decode > 1 and self.decode_s > 0 else 0.0

    def line(self) -> str:
        """The machine-readable line `edgec chat --stats` prints after each turn."""
        return f"prefill={self.prefill} reused={self.reused} decode={self.decode} tok/s={self.tok_s:.1f}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tok_s=round(self.tok_s, 3), prefill_tok_s=round(self.prefill_tok_s, 3))
        return d


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0])


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


class Generator:
    """A backend plus the token ids its KV cache holds. `generate` is the loop; `stream` the same as an iterator."""

    def __init__(self, backend: Backend, max_context: int | None = None, stop_tokens: tuple[int, ...] = STOP_TOKENS):
        self.backend = backend
        cfg_max = backend.config.max_position_embeddings
        self.max_context = int(max_context or getattr(backend, "max_context", None) or cfg_max)
        self.stop_tokens = frozenset(stop_tokens)
        self.tokens: list[int] = []  # what the cache holds, position by position
        self.stats = Stats()
        backend.reset()

    def reset(self) -> None:
        self.backend.reset()
        self.tokens = []

    def prefill(self, prompt: list[int]) -> np.ndarray:
        """Bring the cache to `prompt` reusing the longest common prefix; logits [V] for the next token."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise EdgecError("empty prompt")
        if len(prompt) >= self.max_context:
            raise EdgecError(f"prompt has {len(prompt)} tokens, the context holds {self.max_context}")
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)  # at least one token gives the logits
        st = self.stats
        st.prompt, st.reused, st.prefill = len(prompt), keep, len(prompt) - keep
        t0 = time.perf_counter()
        if keep < len(self.tokens):
            self.backend.truncate(keep)
            del self.tokens[keep:]
        if self.backend.length != keep:
            raise EdgecError(f"{self.backend.name}: cache holds {self.backend.length} tokens after truncate({keep})")
        logits = self.backend.forward(prompt[keep:])
        self.tokens.extend(prompt[keep:])
        st.prefill_s = time.perf_counter() - t0
        return np.asarray(logits, dtype=np.float32).reshape(-1)

    def stream(self, prompt: list[int], sampling: Sampling, guard: Guard | None = None) -> Iterator[int]:
        """Yield sampled token ids (the stop token last, when one ends the reply); `self.stats` is kept current.
        `guard` constrains every sampled token (its mask is computed while the forward runs).
        Closing the iterator early (a consumer that stops reading) leaves the cache holding exactly `self.tokens`;
        an error or Ctrl-C inside a forward rolls the cache back to them before it propagates."""
        self.stats = st = Stats()
        sample = Sampler(sampling)
        t0 = time.perf_counter()
        try:
            ahead = _MASKER.submit(guard.mask) if guard is not None else None
            logits = self.prefill(prompt)
            t1 = None
            while True:
                tok = sample_allowed(sample, logits, ahead.result() if ahead is not None else None)
                if guard is not None:
                    guard.consume(tok)
                st.decode += 1
                if t1 is None:
                    t1 = time.perf_counter()
                    st.ttft_s = t1 - t0
                st.decode_s = time.perf_counter() - t1
                yield tok
                if tok in self.stop_tokens:
                    st.stop = "return" if tok == RETURN else "call"
                    break
                if st.decode >= sampling.max_tokens:
                    st.stop = "max_tokens"
                    break
                if len(self.tokens) + 1 >= self.max_context:
                    st.stop = "context"
                    break
                if guard is not None:
                    ahead = _MASKER.submit(guard.mask)
                logits = np.asarray(self.backend.forward([tok]), dtype=np.float32).reshape(-1)
                self.tokens.append(tok)
                st.decode_s = time.perf_counter() - t1
        except (Exception, KeyboardInterrupt):
            self._repair()
            raise
        st.kv_bytes = self.backend.kv_bytes()

    def generate(self, prompt: list[int], sampling: Sampling,
                 on_token: Callable[[int], None] | None = None, guard: Guard | None = None) -> Result:
        """Run `stream` to the end, calling `on_token` per token. Ctrl-C stops the reply (stop='interrupted') and
        leaves the cache consistent with `self.tokens`, so the session goes on."""
        out = Result()
        try:
            for tok in self.stream(prompt, sampling, guard):
                out.tokens.append(tok)
                if on_token is not None:
                    on_token(tok)
        except KeyboardInterrupt:  # `stream` has already rolled the cache back
            self.stats.stop = "interrupted"
        out.stats = self.stats
        return out

    def _repair(self) -> None:
        """After an interrupted forward, roll the cache back to the tokens known to be in it (or start over)."""
        try:
            n = len(self.tokens)
            if self.backend.length != n:
                self.backend.truncate(min(n, self.backend.length))
                if self.backend.length != n:
                    raise RuntimeError
        except Exception:
            self.reset()
