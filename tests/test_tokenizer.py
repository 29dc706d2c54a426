"""o200k_harmony tokenizer vs openai-harmony (tiktoken core) and vs HF `tokenizers` loading our tokenizer.json."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from edgec.harmony.tokenizer import SPECIAL_TOKENS, Tokenizer, o200k_ranks, tokenizer_json_path, write_tokenizer_files

SHARED = Path(__file__).resolve().parents[2] / "shared"

BATTERY = [
    "", "Hello world", "hello", " Hello", "  leading  spaces\n\n\n  trailing   ", "I'm we'LL THEY'RE don't Shan'T",
    "12345678901 3.14159 1,000,000 0x1F 2024-06-01", "日本語のテキスト 中文 한국어 العربية हिन्दी",
    "tab\there\r\nCRLF\rCR",
    "émojis 🎉🤖👍🏽 and ZWJ 👨‍👩‍👧 flags 🇫🇷", "def f(x):\n\treturn x**2  # comment\r\n", "<|start|>not special<|end|>",
    "\u0000\u0001 control \x7f\u200b zero width", "ÀÉÎÕÜ ﬁ ligature ǅ titlecase", "   \n  \t\n", "a" * 300,
    "=" * 200 + "\n", "мир привет Γειά σου", "x = {'a': [1, 2, 3]}; y=x['a'][0]//2", "$$\\frac{a}{b}$$ ∑ ∫ √",
    "http://example.com/path?q=1&r=2#frag", "ABCdefGHI jklMNO", "\n\n\n", " ", "''''", "a\u0301e\u0301 combining",
    "https://x.y/" + "ab/" * 30, "    def indented():\n        pass\n", "!!!???...,,,", "😀" * 20,
]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcdefXYZ 0189\n\t\r.,;:'\"!?-_=+/*()[]{}<>|#@$%^&~`\\éüßñ日本語中文한Жж🎉👍🏽\u200b\u0301\u00a0\u3000"
                "'s'T'll'RE")
    out = []
    for _ in range(n):
        k = rng.randint(0, 80)
        out.append("".join(rng.choice(alphabet) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def enc():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def hf():
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(tokenizer_json_path()))


def test_vendored_vocabulary_is_o200k_base():
    ranks = o200k_ranks()
    shared = {}
    for line in (SHARED / "data" / "o200k_base.tiktoken").read_bytes().splitlines():
        tok, rank = line.split()
        shared[base64.b64decode(tok)] = int(rank)
    assert ranks == shared and len(ranks) == 199998


def test_encode_matches_openai_harmony(enc):
    tok = Tokenizer.default()
    for text in BATTERY + random_texts(400, seed=1):
        ids = tok.encode(text)
        assert ids == enc.encode(text, disallowed_special=()), repr(text)
        assert tok.decode(ids) == text


def test_special_tokens_match_openai_harmony(enc):
    tok = Tokenizer.default()
    text = "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>yo<|return|>x<|call|>"
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    for i, name in SPECIAL_TOKENS.items():
        if i == 200018:  # HF's published files name it <|endofprompt|>, openai-harmony <|reserved_200018|>
            continue
        assert enc.decode([i]) == name and tok.decode([i]) == name
        assert enc.is_special_token(i)
    assert tok.token_id("<|constrain|>") == 200003 and tok.vocab_size == 201088


def test_hf_tokenizers_load_our_tokenizer_json(enc, hf):
    assert hf.get_vocab_size() == 201088
    for text in BATTERY + random_texts(300, seed=2):
        if "<|" in text:  # HF always splits out added tokens: compare against harmony with specials allowed
            assert hf.encode(text, add_special_tokens=False).ids == enc.encode(text, allowed_special="all")
            continue
        ids = enc.encode(text, disallowed_special=())
        assert hf.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert hf.decode(ids, skip_special_tokens=False) == text
    for i in (199998, 200002, 200006, 200012, 201087):
        assert hf.id_to_token(i) == SPECIAL_TOKENS[i]


def test_written_files_and_from_folder(tmp_path, enc):
    write_tokenizer_files(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|return|>" and cfg["added_tokens_decoder"]["200006"]["content"] == "<|start|>"
    # the generic path (parse tokenizer.json, no shortcut) gives the same tokenizer
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    generic = Tokenizer.from_tokenizer_json(data)
    fast = Tokenizer.from_folder(tmp_path)
    for text in BATTERY[:12] + random_texts(50, seed=3):
        assert generic.encode(text) == fast.encode(text) == enc.encode(text, disallowed_special=())
    assert generic.specials == fast.specials


def test_transformers_loads_the_written_folder(tmp_path, enc):
    """A folder with our tokenizer files loads in transformers (what mlx-lm and other peers use) and encodes the
    same ids as openai-harmony, with the published special-token roles (bos/eos/pad)."""
    from transformers import AutoTokenizer

    write_tokenizer_files(tmp_path)
    t = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, len(t)) == (199998, 200002, 199999, 201088)
    for text in BATTERY[:20]:
        if "<|" not in text:
            assert t.encode(text, add_special_tokens=False) == enc.encode(text, disallowed_special=()), repr(text)
    assert t.decode([200006, 13225]) == "<|start|>Hello"


def test_long_pieces_heap_merge_equals_scan(enc):
    """Long pieces use a heap-based merge: same result as the direct scan, and as openai-harmony on long runs."""
    tok = Tokenizer.default()
    rng = random.Random(5)
    for _ in range(300):
        piece = "".join(rng.choice(" =-!?.éab日") for _ in range(rng.randint(2, 90))).encode()
        assert tok._bpe_heap(piece) == tok._bpe_scan(piece)
    for text in ["=-" * 1500, " " * 3000 + "x", "§" * 2000, "!?" * 1000 + "\n" * 50, "ab" * 3000]:
        assert tok.encode(text) == enc.encode(text, disallowed_special=())


@pytest.mark.parametrize("data, fragment", [
    ([1], "not a byte-level BPE tokenizer"),
    ({"model": []}, "not a byte-level BPE tokenizer"),
    ({"model": {"type": "BPE", "vocab": {"a": "x"}}}, "model.vocab: token id 'x' is not a non-negative integer"),
    ({"model": {"type": "BPE", "vocab": {"a": 1}}, "added_tokens": [{"id": "x", "content": "y"}]},
     "added_tokens: token id 'x'"),
    ({"model": {"type": "BPE", "vocab": {"a": 1}}, "added_tokens": 5}, "added_tokens: must be a list of objects"),
])
def test_a_malformed_tokenizer_json_is_one_line(tmp_path, data, fragment):
    from edgec.errors import EdgecError

    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(EdgecError, match="tokenizer.json: " + fragment.split(":")[0]) as e:
        Tokenizer.from_folder(tmp_path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
