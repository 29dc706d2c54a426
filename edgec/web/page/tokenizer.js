// o200k_harmony in the browser, read from an output's tokenizer.json: the same algorithm as
// edgec/harmony/tokenizer.py (tiktoken's): split with the pre-tokenizer regex, then merge each piece's bytes
// pairwise, always the adjacent pair whose concatenation has the lowest rank (leftmost on ties). The vocabulary's
// ids are the ranks (o200k_base). Byte-level strings (GPT-2's byte -> char map) stand for byte strings throughout.

const BYTE_TO_CHAR = (() => {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n++); }
  const map = new Array(256);
  bs.forEach((b, i) => { map[b] = String.fromCharCode(cs[i]); });
  return map;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

// tiktoken (Rust regex) and Python's `regex` take \s as Unicode White_Space; JavaScript's \s differs (it adds
// U+FEFF, lacks U+0085), so \s and \S are spelled out.
const WS = '\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';

export function jsPattern(pattern) {
  let out = '', inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === '\\') {
      const d = pattern[i + 1];
      i++;
      if (d === 's') out += inClass ? WS : `[${WS}]`;
      else if (d === 'S') out += inClass ? unsupported() : `[^${WS}]`;
      else out += c + d;
      continue;
    }
    if (c === '[' && !inClass) inClass = true;
    else if (c === ']' && inClass) inClass = false;
    out += c;
  }
  // (?i:...) modifiers: spell the contractions' cases out (the only use in o200k's pattern)
  return out.replace(/\(\?i:([^)]*)\)/g, (_, alts) => '(?:' + alts.replace(/[a-z]/g, ch => `[${ch}${ch.toUpperCase()}]`) + ')');
}

function unsupported() { throw new Error('\\S inside a character class is not supported'); }

function splitRegex(pre) {
  if (!pre) return null;
  if (pre.type === 'Split' && pre.pattern && pre.pattern.Regex) return pre.pattern.Regex;
  for (const p of pre.pretokenizers || []) { const r = splitRegex(p); if (r) return r; }
  return null;
}

const O200K_PATTERN = [
  "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
  "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
  '\\p{N}{1,3}', ' ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*', '\\s*[\\r\\n]+', '\\s+(?!\\S)', '\\s+',
].join('|');

const utf8 = new TextEncoder();

export class Tokenizer {
  constructor(json) {
    if (!json.model || json.model.type !== 'BPE') throw new Error('tokenizer.json: not a byte-level BPE tokenizer');
    this.ranks = new Map(Object.entries(json.model.vocab));
    this.bytes = [];  // id -> Uint8Array
    for (const [s, id] of this.ranks) this.bytes[id] = Uint8Array.from(s, c => CHAR_TO_BYTE.get(c));
    this.special = new Map();  // name -> id
    for (const t of json.added_tokens || []) { this.special.set(t.content, t.id); this.bytes[t.id] = utf8.encode(t.content); }
    this.names = new Map([...this.special].map(([n, i]) => [i, n]));
    this.pattern = new RegExp(jsPattern(splitRegex(json.pre_tokenizer) || O200K_PATTERN), 'gu');
    const esc = [...this.special.keys()].sort((a, b) => b.length - a.length).map(s => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
    this.specialRe = new RegExp(esc.join('|'), 'g');
  }

  bpe(piece) {
    const whole = this.ranks.get(piece);
    if (whole !== undefined) return [whole];
    const parts = [...piece];
    for (;;) {
      let best = Infinity, at = -1;
      for (let i = 0; i + 1 < parts.length; i++) {
        const r = this.ranks.get(parts[i] + parts[i + 1]);
        if (r !== undefined && r < best) { best = r; at = i; }
      }
      if (at < 0) break;
      parts.splice(at, 2, parts[at] + parts[at + 1]);
    }
    return parts.map(p => this.ranks.get(p));
  }

  // text -> ids; special-token names are plain text (as encode_ordinary)
  encodeOrdinary(text) {
    const out = [];
    for (const m of text.matchAll(this.pattern)) {
      const piece = Array.from(utf8.encode(m[0]), b => BYTE_TO_CHAR[b]).join('');
      out.push(...this.bpe(piece));
    }
    return out;
  }

  // text -> ids with the special tokens' names turned into their ids (encode(allowed_special="all"))
  encode(text) {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(this.specialRe)) {
      out.push(...this.encodeOrdinary(text.slice(last, m.index)), this.special.get(m[0]));
      last = m.index + m[0].length;
    }
    out.push(...this.encodeOrdinary(text.slice(last)));
    return out;
  }

  isSpecial(id) { return this.names.has(id); }

  // a streaming decoder: push(id) returns the text whose UTF-8 bytes are complete
  decoder() {
    const d = new TextDecoder('utf-8');
    return {push: id => d.decode(this.bytes[id] || new Uint8Array(), {stream: true}), end: () => d.decode()};
  }

  decode(ids) { const d = this.decoder(); return ids.map(d.push).join('') + d.end(); }
}
