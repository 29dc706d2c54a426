"""o200k_harmony: the byte-level BPE tokenizer of gpt-oss, in pure Python (+ `regex`).

The vocabulary is o200k_base (vendored as `edgec/data/o200k_base.tiktoken.xz`, checked against its sha256 on load)
plus 1,090 special tokens at ids 199998..201087. Encoding follows tiktoken exactly: split the text with the o200k
pre-tokenizer regex, then merge each piece's bytes pairwise, always merging the adjacent pair whose concatenation
has the lowest rank (leftmost on ties).

`write_tokenizer_files(out)` writes the Hugging Face files a published gpt-oss folder holds (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`); the tokenizer.json is generated once from the ranks and cached
in edgec's cache folder (`edgec.hub.cache_dir`: `$EDGEC_CACHE_DIR` or the user cache folder), keyed by the
vocabulary hash.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import lzma
import operator
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex

from ..errors import EdgecError
from ..jsonio import read_json

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
VOCAB_SIZE = 201088
FIRST_SPECIAL = 199998
_NAMED = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    # The published gpt-oss tokenizer.json names 200018 after o200k_base's <|endofprompt|>; openai-harmony calls it
    # <|reserved_200018|>. Both are unused by Harmony; we follow the published Hugging Face files.
    200018: "<|endofprompt|>",
}
# Hugging Face names of every special id (199998..201087).
SPECIAL_TOKENS: dict[int, str] = {i: _NAMED.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, VOCAB_SIZE)}
_GENERATOR_VERSION = "1"


# ----------------------------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------------------------

def _vendored_bytes() -> bytes:
    raw = lzma.decompress(resources.files("edgec").joinpath("data/o200k_base.tiktoken.xz").read_bytes())
    if hashlib.sha256(raw).hexdigest() != O200K_SHA256:
        raise EdgecError("edgec/data/o200k_base.tiktoken.xz: sha256 of the vocabulary does not match o200k_base")
    return raw


@lru_cache(maxsize=1)
def o200k_ranks() -> dict[bytes, int]:
    """o200k_base's mergeable ranks (token bytes -> id) from the vendored, hash-checked copy."""
    ranks: dict[bytes, int] = {}
    for line in _vendored_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE files."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def _to_unicode(b: bytes) -> str:
    enc = _byte_encoder()
    return "".join(enc[x] for x in b)


# ----------------------------------------------------------------------------------------------------------------
# runtime tokenizer
# ----------------------------------------------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE with tiktoken's merge rule; token-for-token identical to openai-harmony's o200k_harmony.

    `encode(text)` treats special-token strings as plain text (like harmony's `encode_ordinary`, which its renderer
    uses for all text); pass `allowed_special="all"` (or a set of names) to turn them into special ids.
    """

    def __init__(self, ranks: dict[bytes, int], specials: dict[int, str], pattern: str = O200K_PATTERN):
        self.ranks = ranks
        self.specials = dict(specials)
        self.special_ids = {name: i for i, name in self.specials.items()}
        self.pattern = regex.compile(pattern)
        self._decoder: list[bytes | None] = [None] * (max([*ranks.values(), *specials.keys(), -1]) + 1)
        for b, i in ranks.items():
            self._decoder[i] = b
        for i, name in specials.items():
            self._decoder[i] = name.encode()
        self._special_re: dict[frozenset[str], regex.Pattern] = {}
        self._piece_cache: dict[bytes, tuple[int, ...]] = {}

    # construction ------------------------------------------------------------------------------------------
    @classmethod
    @lru_cache(maxsize=1)
    def default(cls) -> Tokenizer:
        """o200k_harmony from the vendored vocabulary (no model folder needed)."""
        return cls(o200k_ranks(), SPECIAL_TOKENS)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` from a model or converted folder (or take the file itself)."""
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise EdgecError(f"{p}: no tokenizer.json")
        st = f.stat()
        return _from_file(str(f.resolve()), st.st_size, st.st_mtime_ns)

    @classmethod
    def from_tokenizer_json(cls, data: dict, where: str = "tokenizer.json") -> Tokenizer:
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            kind = model.get("type") if isinstance(model, dict) else None
            raise EdgecError(f"{where}: not a byte-level BPE tokenizer (model.type={kind!r})")
        dec = {c: b for b, c in _byte_encoder().items()}
        try:
            ranks = {bytes(dec[c] for c in tok): _token_id(i) for tok, i in model["vocab"].items()}
        except KeyError as e:
            raise EdgecError(f"{where}: vocabulary entry is not byte-level ({e})") from None
        except ValueError as e:
            raise EdgecError(f"{where}: model.vocab: {e}") from None
        added = data.get("added_tokens") or []
        try:
            if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
                raise ValueError("must be a list of objects")
            specials = {_token_id(t.get("id")): str(t.get("content")) for t in added}
        except ValueError as e:
            raise EdgecError(f"{where}: added_tokens: {e}") from None
        pattern = _split_regex(data.get("pre_tokenizer")) or O200K_PATTERN
        try:
            return cls(ranks, specials, pattern)
        except regex.error as e:
            raise EdgecError(f"{where}: pre-tokenizer regex does not compile ({e})") from None

    # encoding -----------------------------------------------------------------------------------------------
    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        """tiktoken's byte-pair merge of one piece: repeatedly merge the adjacent pair whose concatenation has the
        lowest rank (leftmost on ties). A direct scan for short pieces, a heap for long ones (O(n log n), so a
        pasted line of 50,000 '=' stays fast)."""
        return self._bpe_heap(piece) if len(piece) > 48 else self._bpe_scan(piece)

    def _bpe_scan(self, piece: bytes) -> tuple[int, ...]:
        ranks = self.ranks
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return tuple(ranks[p] for p in parts)

    def _bpe_heap(self, piece: bytes) -> tuple[int, ...]:
        ranks, n = self.ranks, len(piece)
        nxt = list(range(1, n + 1))  # part starting at i spans piece[i:nxt[i]]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                r = ranks.get(piece[i:nxt[j]])
                if r is not None:
                    heapq.heappush(heap, (r, i, nxt[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, e = heapq.heappop(heap)
            if not alive[i] or nxt[i] >= n or nxt[nxt[i]] != e:
                continue  # stale: one of the two parts has changed since this pair was queued
            alive[nxt[i]] = False
            nxt[i] = e
            if e < n:
                prv[e] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        out, i = [], 0
        while i < n:
            out.append(ranks[piece[i:nxt[i]]])
            i = nxt[i]
        return tuple(out)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text; special-token strings are ordinary text here."""
        out: list[int] = []
        ranks, cache = self.ranks, self._piece_cache
        for m in self.pattern.finditer(text):
            piece = m.group().encode("utf-8", "surrogatepass")
            r = ranks.get(piece)
            if r is not None:
                out.append(r)
                continue
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(cache) < 100_000:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, allowed_special: str | set[str] | frozenset[str] = frozenset()) -> list[int]:
        """Encode text. Special-token strings become special ids only if named in `allowed_special` (or "all")."""
        allowed = frozenset(self.special_ids) if allowed_special == "all" else frozenset(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        pat = self._special_re.get(allowed)
        if pat is None:
            pat = self._special_re[allowed] = regex.compile("|".join(regex.escape(s) for s in sorted(allowed)))
        out: list[int] = []
        start = 0
        for m in pat.finditer(text):
            out += self.encode_ordinary(text[start:m.start()])
            out.append(self.special_ids[m.group()])
            start = m.end()
        out += self.encode_ordinary(text[start:])
        return out

    # decoding -----------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: list[int]) -> bytes:
        """Bytes of the tokens; special tokens decode to their names. Unknown ids raise EdgecError."""
        dec, n = self._decoder, len(self._decoder)
        parts = []
        for i in ids:
            try:
                j = operator.index(i)  # int, numpy integer
            except TypeError:
                j = -1
            b = dec[j] if 0 <= j < n else None
            if b is None:
                raise EdgecError(f"token id {i} is not in the vocabulary")
            parts.append(b)
        return b"".join(parts)

    def decode(self, ids: list[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors)

    # lookups ------------------------------------------------------------------------------------------------
    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. token_id("<|start|>") == 200006."""
        try:
            return self.special_ids[name]
        except KeyError:
            raise EdgecError(f"unknown special token {name!r}") from None

    def is_special(self, token: int) -> bool:
        return token in self.specials

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)


def _split_regex(pre: dict | None) -> str | None:
    """The Split regex of a tokenizer.json pre_tokenizer (possibly inside a Sequence)."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "Split" and isinstance(pre.get("pattern"), dict):
        return pre["pattern"].get("Regex")
    for sub in pre.get("pretokenizers") or []:
        r = _split_regex(sub)
        if r:
            return r
    return None


@lru_cache(maxsize=4)
def _from_file(path: str, size: int, mtime_ns: int) -> Tokenizer:
    cached = _cache_path()
    if cached is not None and cached.is_file() and cached.stat().st_size == size and _same_file(path, cached):
        return Tokenizer.default()  # byte-identical to the file we generate: skip parsing 27 MB of JSON
    data = read_json(Path(path))
    return Tokenizer.from_tokenizer_json(data, path)


def _same_file(a: str | Path, b: str | Path) -> bool:
    def digest(p):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.digest()

    return digest(a) == digest(b)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer files
# ----------------------------------------------------------------------------------------------------------------

def _added_token(i: int, name: str) -> dict:
    return {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def build_tokenizer_json() -> dict:
    """tokenizer.json for o200k_harmony: vocab from the ranks, merges = every split of a token into two tokens,
    ordered by the merged token's rank (HF's BPE then merges exactly as tiktoken does)."""
    ranks = o200k_ranks()
    merges: list[tuple[int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        local = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in ranks and tok[k:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, a, b) for a, b in local)
    merges.sort(key=lambda m: m[0])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, n) for i, n in SPECIAL_TOKENS.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {_to_unicode(t): r for t, r in ranks.items()},
                  "merges": [[_to_unicode(a), _to_unicode(b)] for _, a, b in merges]},
    }


def _cache_path() -> Path | None:
    from ..hub import cache_dir

    try:
        return cache_dir() / f"o200k_harmony-{O200K_SHA256[:16]}-v{_GENERATOR_VERSION}.tokenizer.json"
    except RuntimeError:  # no home directory
        return None


def tokenizer_json_path() -> Path:
    """Path of the generated tokenizer.json (built on first use, then cached; a temp file if no cache is writable)."""
    cached = _cache_path()
    if cached is not None and cached.is_file():
        return cached
    name = cached.name if cached is not None else f"o200k_harmony-v{_GENERATOR_VERSION}.tokenizer.json"
    text = json.dumps(build_tokenizer_json(), ensure_ascii=False, separators=(",", ":"))
    targets = ([cached] if cached is not None else []) + [Path(tempfile.gettempdir()) / "edgec" / name]
    for target in targets:
        if target.is_file():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
            return target
        except OSError:
            continue
    raise EdgecError(f"cannot write the generated tokenizer.json to {cached} or the temp folder")


def tokenizer_config() -> dict:
    return {
        "added_tokens_decoder": {str(i): {k: v for k, v in _added_token(i, n).items() if k != "id"}
                                 for i, n in SPECIAL_TOKENS.items()},
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|return|>",
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into `out`."""
    out = Path(out)
    shutil.copyfile(tokenizer_json_path(), out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")


def _token_id(v: object) -> int:
    """A token id from tokenizer.json: a non-negative integer (ValueError naming the value otherwise)."""
    if type(v) is not int or v < 0:
        raise ValueError(f"token id {v!r} is not a non-negative integer")
    return v
