"""The generation loop: sampling filters against transformers' logits warpers, seeded determinism, stop rules,
statistics, and prompt reuse (longest common prefix + truncate) against a fresh prefill."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.errors import EdgecError
from edgec.harmony.render import CALL, RETURN
from edgec.runtime.base import Backend
from edgec.runtime.generate import Generator, Sampler, Sampling, common_prefix, next_token_probs
from edgec.spec import preset

# ---- sampling ----------------------------------------------------------------------------------------------------
HAND = np.log(np.array([0.05, 0.5, 0.1, 0.2, 0.15]))  # best to worst: 1, 3, 4, 2, 0


@pytest.mark.parametrize("kw, expect", [
    (dict(top_k=2), {1: 0.5 / 0.7, 3: 0.2 / 0.7}),
    (dict(top_p=0.7), {1: 0.5 / 0.7, 3: 0.2 / 0.7}),  # 0.5 + 0.2 reaches 0.7: the nucleus stops there
    (dict(top_p=0.71), {1: 0.5 / 0.85, 3: 0.2 / 0.85, 4: 0.15 / 0.85}),
    (dict(top_p=0.3), {1: 1.0}),
    # top-p acts on the top-k renormalised distribution (0.59 + 0.24 >= 0.8); on the raw one it would keep three
    (dict(top_k=3, top_p=0.8), {1: 0.5 / 0.7, 3: 0.2 / 0.7}),
    (dict(temperature=0.5), {i: p * p / 0.325 for i, p in enumerate([0.05, 0.5, 0.1, 0.2, 0.15])}),
    (dict(temperature=0), {1: 1.0}),
])
def test_filters_on_a_hand_made_distribution(kw, expect):
    p = next_token_probs(HAND, Sampling(**kw))
    want = np.zeros(5)
    for i, v in expect.items():
        want[i] = v
    np.testing.assert_allclose(p, want, atol=1e-12)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.9), (1.0, 50, 1.0), (1.3, 4000, 0.95),
                                                       (1.0, 0, 0.999)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    """Full 201,088-token vocabulary, including a nucleus wider than the 1,024 pre-selected candidates."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(3).normal(0, 2, 201088).astype(np.float32)
    t = torch.tensor(logits[None], dtype=torch.float64)
    t = TemperatureLogitsWarper(temperature)(None, t)
    if top_k:
        t = TopKLogitsWarper(top_k)(None, t)
    if top_p < 1:
        t = TopPLogitsWarper(top_p)(None, t)
    want = torch.softmax(t, -1)[0].numpy()
    got = next_token_probs(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
    assert ((got > 0) == (want > 0)).all()
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    s = Sampling(temperature=1.0, top_k=4, seed=7)
    assert _draws(s, 2000) == _draws(s, 2000)
    assert _draws(Sampling(seed=8), 50) != _draws(Sampling(seed=7), 50)
    freq = np.bincount(_draws(Sampling(top_k=4, seed=1), 20000), minlength=5) / 20000
    np.testing.assert_allclose(freq, [0, 0.5 / 0.95, 0.1 / 0.95, 0.2 / 0.95, 0.15 / 0.95], atol=0.015)


def _draws(s: Sampling, n: int) -> list[int]:
    sample = Sampler(s)
    return [sample(HAND) for _ in range(n)]


def test_sampling_settings_are_validated():
    nan, inf = float("nan"), float("inf")
    for bad in (dict(temperature=-1), dict(temperature=nan), dict(temperature=inf), dict(top_p=0), dict(top_p=1.5),
                dict(top_p=nan), dict(top_k=-1), dict(max_tokens=0)):
        with pytest.raises(EdgecError):
            Sampling(**bad)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([9], [1]) == 0


# ---- the loop on a scripted backend --------------------------------------------------------------------------------
class Scripted(Backend):
    """A backend whose next token is scripted by position; records what was fed and truncated."""

    name = "scripted"

    def __init__(self, script: dict[int, int], vocab: int = 201088):
        self.config = preset("tiny")
        self.script, self.vocab = script, vocab
        self.fed: list[int] = []
        self.truncations: list[int] = []

    @property
    def length(self) -> int:
        return len(self.fed)

    def forward(self, ids, all_logits=False):
        self.fed.extend(int(i) for i in ids)
        out = np.zeros((1, self.vocab), np.float32)
        out[0, self.script.get(len(self.fed), 42)] = 10.0
        return out

    def truncate(self, n):
        self.truncations.append(n)
        del self.fed[n:]


def test_stops_on_return_without_feeding_it():
    b = Scripted({3: 7, 4: 8, 5: RETURN})
    g = Generator(b)
    res = g.generate([1, 2, 3], Sampling(temperature=0, max_tokens=50))
    assert res.tokens == [7, 8, RETURN]
    assert b.fed == [1, 2, 3, 7, 8] and g.tokens == b.fed
    st = res.stats
    assert (st.prompt, st.reused, st.prefill, st.decode, st.stop) == (3, 0, 3, 3, "return")
    assert st.line().startswith("prefill=3 reused=0 decode=3 tok/s=")


def test_stops_on_call_at_max_tokens_and_at_the_context_end():
    assert Generator(Scripted({2: CALL})).generate([1, 2], Sampling(temperature=0)).stats.stop == "call"
    res = Generator(Scripted({})).generate([1, 2], Sampling(temperature=0, max_tokens=5))
    assert res.tokens == [42] * 5 and res.stats.stop == "max_tokens"
    g = Generator(Scripted({}), max_context=6)
    res = g.generate([1, 2], Sampling(temperature=0, max_tokens=100))
    assert res.stats.stop == "context" and len(g.tokens) + 1 == 6
    with pytest.raises(EdgecError, match="context holds 6"):
        g.generate([1] * 6, Sampling())


def test_reuse_rolls_back_to_the_common_prefix():
    b = Scripted({})
    g = Generator(b)
    g.generate([1, 2, 3, 4, 5], Sampling(temperature=0, max_tokens=3))
    assert b.fed == [1, 2, 3, 4, 5, 42, 42]
    st = g.generate([1, 2, 3, 9, 9, 9], Sampling(temperature=0, max_tokens=1)).stats
    assert b.truncations[-1] == 3 and b.fed == [1, 2, 3, 9, 9, 9]
    assert (st.reused, st.prefill) == (3, 3)
    st = g.generate([1, 2, 3, 9, 9, 9], Sampling(temperature=0, max_tokens=1)).stats  # identical prompt
    assert (st.reused, st.prefill) == (5, 1)  # one token is always recomputed: it gives the logits


def test_interrupt_keeps_the_session_consistent():
    class Interrupting(Scripted):
        def forward(self, ids, all_logits=False):
            if len(self.fed) >= 4:
                self.fed.extend(int(i) for i in ids)  # half-done forward, then Ctrl-C
                raise KeyboardInterrupt
            return super().forward(ids, all_logits)

    b = Interrupting({})
    g = Generator(b)
    res = g.generate([1, 2, 3], Sampling(temperature=0, max_tokens=50))
    assert res.stats.stop == "interrupted" and b.fed == g.tokens == [1, 2, 3, 42]


# ---- real model: prompt reuse gives the logits of a fresh prefill -------------------------------------------------
def test_reuse_equals_fresh_prefill_on_the_reference(tiny, ids300):
    from edgec.runtime.reference_backend import ReferenceBackend

    g = Generator(ReferenceBackend(tiny))
    g.generate(ids300[:120], Sampling(temperature=0, max_tokens=4))
    second = ids300[:100] + ids300[150:170]  # diverges inside the cached tokens, as a dropped analysis does
    logits = g.prefill(second)
    assert g.stats.reused == 100 and g.stats.prefill == 20
    fresh = ReferenceBackend(tiny).forward(second)[0]
    np.testing.assert_array_equal(logits, fresh)


def test_generate_cli_is_reproducible_with_a_seed(tiny):
    import json

    from click.testing import CliRunner

    from edgec.cli import main

    def tokens(seed: int) -> list[int]:
        r = CliRunner().invoke(main, ["generate", str(tiny), "--prompt", "hi", "--json", "--max-tokens", "3",
                                      "--seed", str(seed), "--max-context", "256"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["tokens"]

    assert tokens(11) == tokens(11) != tokens(12)


def test_prompt_dash_reads_stdin(tiny):
    import json

    from click.testing import CliRunner

    from edgec.cli import main

    def out(prompt: str, stdin: str | None = None) -> tuple:
        r = CliRunner().invoke(main, ["generate", str(tiny), "--prompt", prompt, "--json", "--max-tokens", "2",
                                      "--temperature", "0", "--max-context", "512"], input=stdin)
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        return res["stats"]["prompt"], res["tokens"]

    text = "line one\nline two"
    assert out("-", text + "\n") == out(text) != out("line one")
    r = CliRunner().invoke(main, ["generate", str(tiny), "--prompt", "-"], input="\n")
    assert r.exit_code == 2 and "stdin was empty" in r.stderr
