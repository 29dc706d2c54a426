// Harmony in the browser: the render of edgec/harmony/render.py for the messages a chat holds (system, developer,
// user, earlier final answers) and a streaming parse of the reply (openai-harmony's StreamableParser, as
// edgec/harmony/parser.py: header up to <|message|>, text up to <|end|>/<|return|>/<|call|>; stray tokens and an
// over-long header become plain assistant text, so a model that breaks the format never stops the page).

export const T = {START: 200006, END: 200007, MESSAGE: 200008, CHANNEL: 200005, CONSTRAIN: 200003, RETURN: 200002,
                  CALL: 200012};
export const STOP_TOKENS = [T.RETURN, T.CALL];
export const IDENTITY = 'You are ChatGPT, a large language model trained by OpenAI.';
const MAX_HEADER_TOKENS = 64;

export function today() {  // the local date, as Python's datetime.date.today().isoformat()
  const d = new Date(), p = n => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
}

export function systemText({identity = IDENTITY, cutoff = '2024-06', date = null, reasoning = 'medium'} = {}) {
  const top = [identity, `Knowledge cutoff: ${cutoff}`, ...(date ? [`Current date: ${date}`] : [])];
  return [top.join('\n'), `Reasoning: ${reasoning}`,
          '# Valid channels: analysis, commentary, final. Channel must be included for every message.'].join('\n\n');
}

// one message: <|start|>{role}[<|channel|>{channel}]<|message|>{text}<|end|>
export function renderMessage(tok, {role, channel = null, text}) {
  const enc = s => tok.encodeOrdinary(s);
  return [T.START, ...enc(role), ...(channel ? [T.CHANNEL, ...enc(channel)] : []), T.MESSAGE, ...enc(text), T.END];
}

// the prompt: system, developer (when it has instructions), the history, then <|start|>assistant
export function renderPrompt(tok, {system = {}, developer = null, messages = []}) {
  const ids = renderMessage(tok, {role: 'system', text: systemText(system)});
  if (developer) ids.push(...renderMessage(tok, {role: 'developer', text: `# Instructions\n\n${developer}`}));
  for (const m of messages) ids.push(...renderMessage(tok, m));
  ids.push(T.START, ...tok.encodeOrdinary('assistant'));
  return ids;
}

// feed(id) -> events: {kind: 'start', channel, recipient} | {kind: 'text', channel, text} | {kind: 'done', ...}
export class StreamParser {
  constructor(tok) {
    this.tok = tok;
    this.state = 'header';  // after a prompt ending in <|start|>assistant
    this.header = [];
    this.msg = null;
    this.messages = [];
  }

  _open(channel, recipient) {
    this.msg = {role: 'assistant', channel, recipient, text: '', dec: this.tok.decoder()};
    return {kind: 'start', channel, recipient};
  }

  _text(s) { this.msg.text += s; return s ? [{kind: 'text', channel: this.msg.channel, text: s}] : []; }

  _close() {
    const rest = this._text(this.msg.dec.end()), m = this.msg;
    delete m.dec;
    this.messages.push(m);
    this.msg = null;
    this.state = 'idle';
    return [...rest, {kind: 'done', channel: m.channel, text: m.text}];
  }

  _parseHeader() {  // role tokens, then <|channel|>name, ' to=recipient', ' <|constrain|>type'
    let channel = null, recipient = null, text = '', inChannel = false;
    for (const id of this.header) {
      if (id === T.CHANNEL) { inChannel = true; text = ''; continue; }
      text += this.tok.decode([id]);
      if (inChannel) channel = text.trim().split(/\s+/)[0] || null;
    }
    const to = this.tok.decode(this.header.filter(i => i !== T.CHANNEL)).match(/to=(\S+)/);
    if (to) recipient = to[1];
    return [channel, recipient];
  }

  feed(id) {
    if (this.state === 'idle') {
      if (id === T.START) { this.state = 'role'; this.header = []; return []; }
      this.state = 'text';
      return [this._open(null, null), ...this._text(this.msg.dec.push(id))];
    }
    if (this.state === 'role' || this.state === 'header') {
      if (id === T.MESSAGE) {
        const [channel, recipient] = this._parseHeader();
        this.state = 'text';
        return [this._open(channel, recipient)];
      }
      this.header.push(id);
      if (this.header.length <= MAX_HEADER_TOKENS) return [];
      this.state = 'text';  // not a header: the tokens are text
      const ev = this._open(null, null), ids = this.header;
      this.header = [];
      return [ev, ...ids.flatMap(i => this._text(this.msg.dec.push(i)))];
    }
    if (id === T.END || id === T.RETURN || id === T.CALL) return this._close();
    if (id === T.START) { const ev = this._close(); this.state = 'role'; this.header = []; return ev; }
    return this._text(this.msg.dec.push(id));
  }

  finish() {  // end of stream: a cut-off message is closed, a cut-off header is text (as edgec's parser)
    if (!this.msg && this.header.length && this.state !== 'idle') {
      const ev = this._open(null, null), ids = this.header;
      this.header = [];
      return [ev, ...ids.flatMap(i => this._text(this.msg.dec.push(i))), ...this._close()];
    }
    return this.msg ? this._close() : [];
  }
}
