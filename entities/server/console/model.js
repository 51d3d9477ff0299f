// The entity stream folded into what the entity page shows: wakes (with their triggers,
// attempts, errors and agent runs) and a conversation.
//
// What entities write (see entities/_run.py, entities/_context.py, entities/agent/_loop.py):
//   inbox            a message to the entity (value.payload, value.from)
//   wakes            a wake-up that is not a message (child finished, timer, cron, observed change)
//   runs             key = wake id `w{from}-{to}`: a wake's outcome (status, attempt, duration_ms,
//                    error, worker); key `{wake}.run{n}`: a run recorded inside it (agent runs)
//   errors           key `{wake}.{attempt}`: a failed attempt, with its traceback
//   steps            journaled steps; `step:{wake}.agent{n}.model{r}` holds a model answer
//                    (text, tool_calls), `step:{wake}.agent{n}.tool{r}.{call id}` a tool result
//   text_deltas      streamed model text, appended while the run goes (step, seq, delta)
//   reasoning_deltas streamed model reasoning (thinking), like text_deltas
//   reasoning        key `{wake}.agent{n}.{round}`: a round's whole reasoning (round, text)
//   tool_calls       a tool call's record (name, arguments, result, error, duration_ms)
//   texts            a reply (value; text for text replies)
// A wake id names the stream positions it covers: `w4-9` took the events at positions 5..9.

const WAKE = /^w(\d+)-(\d+)$/;
const STEP = /^step:(w\d+-\d+)\.agent(\d+)\.(model|tool)(\d+)(?:\.(.*))?$/;
const DELTA_STEP = /^(w\d+-\d+)\.agent(\d+)\.model(\d+)$/;
const TRIGGERS = new Set(['inbox', 'wakes', 'entity_created', 'signals']);

export class EntityModel {
  constructor() {
    this.events = []; // [{pos, event}] in stream order
    this.byPos = new Map(); // position -> event (triggers only)
    this.wakes = new Map(); // wake id -> Wake
    this.owner = new Map(); // position -> the wake that took it
    this.inbox = []; // positions of inbox events, ascending
    this.inboxByKey = new Map(); // message key -> position of its inbox event
    this.covered = 0; // the highest position a known wake took
    this.closed = false;
  }

  wake(id) {
    let wake = this.wakes.get(id);
    if (!wake) {
      const match = WAKE.exec(id);
      wake = {
        id,
        from: match ? Number(match[1]) : 0,
        to: match ? Number(match[2]) : 0,
        run: null, // the latest `runs` record of the wake
        records: new Map(), // `{wake}.run{n}` -> record
        errors: new Map(), // `{wake}.{attempt}` -> errors value
        agents: new Map(), // n -> Map round -> {model, tools: Map, deltas: Map seq -> text}
        replies: new Map(), // texts key -> value
        writes: 0,
        firstSeen: null,
      };
      this.wakes.set(id, wake);
      for (let pos = wake.from + 1; pos <= wake.to; pos += 1) this.owner.set(pos, wake);
      this.covered = Math.max(this.covered, wake.to);
    }
    return wake;
  }

  round(wake, agent, round) {
    if (!wake.agents.has(agent)) wake.agents.set(agent, new Map());
    const rounds = wake.agents.get(agent);
    if (!rounds.has(round)) {
      rounds.set(round, {
        model: null,
        tools: new Map(),
        deltas: new Map(),
        thoughts: new Map(), // seq -> streamed reasoning
        reasoning: null, // the round's recorded reasoning
      });
    }
    return rounds.get(round);
  }

  // Fold a batch in; returns the ids of the wakes it touched ('' when a queued message came).
  add(items) {
    const touched = new Set();
    for (const item of items) {
      this.events.push(item);
      const id = this.apply(item);
      if (id !== null) touched.add(id);
    }
    return touched;
  }

  apply({ pos, event }) {
    const { type, key, value } = event;
    const headers = event.headers || {};
    if (type === 'inbox' && (headers.operation === 'delete' || headers.operation === 'update')) {
      // a queued message cancelled or edited: change the message itself
      const original = this.byPos.get(this.inboxByKey.get(key));
      if (original && headers.operation === 'delete') original.cancelled = true;
      if (original && headers.operation === 'update') {
        original.value = { ...original.value, ...value, edited: true };
      }
      return '';
    }
    if (TRIGGERS.has(type)) {
      this.byPos.set(pos, event);
      if (type === 'inbox') {
        this.inbox.push(pos);
        this.inboxByKey.set(key, pos);
      }
      const owner = this.owner.get(pos);
      return owner ? owner.id : '';
    }
    if (type === 'entity_stopped') this.closed = true;
    let wakeId = WAKE.test(headers.txid || '') ? headers.txid : null;
    if (!wakeId && value && WAKE.test(value.run_id || '')) wakeId = value.run_id;
    if (!wakeId && value && WAKE.test(value.wake_id || '')) wakeId = value.wake_id;
    if (type === 'runs' && WAKE.test(key)) wakeId = key;
    if (!wakeId) return null;
    const wake = this.wake(wakeId);
    wake.firstSeen = wake.firstSeen || headers.timestamp;
    wake.writes += 1;
    if (type === 'runs') {
      if (key === wakeId) wake.run = value;
      else wake.records.set(key, { ...(wake.records.get(key) || {}), ...value });
    } else if (type === 'errors') {
      wake.errors.set(key, value);
    } else if (type === 'steps') {
      const match = STEP.exec(value.name || '');
      if (match) this.step(wake, match, value.result);
    } else if (type === 'text_deltas') {
      const match = DELTA_STEP.exec(value.step || '');
      if (match) {
        const round = this.round(wake, Number(match[2]), Number(match[3]));
        round.deltas.set(value.seq, value.delta);
      }
    } else if (type === 'reasoning_deltas') {
      const match = DELTA_STEP.exec(value.step || '');
      if (match) {
        const round = this.round(wake, Number(match[2]), Number(match[3]));
        round.thoughts.set(value.seq, value.delta);
      }
    } else if (type === 'reasoning') {
      const agent = /\.agent(\d+)\.\d+$/.exec(key);
      const round = this.round(wake, agent ? Number(agent[1]) : 1, value.round ?? 0);
      round.reasoning = value.text || '';
    } else if (type === 'tool_calls') {
      const agent = /\.agent(\d+)\./.exec(key);
      const round = this.round(wake, agent ? Number(agent[1]) : 1, value.round ?? 0);
      if (!round.tools.has(value.call_id)) round.tools.set(value.call_id, value);
    } else if (type === 'texts') {
      wake.replies.set(key, value);
    }
    return wakeId;
  }

  step(wake, match, result) {
    const [, , agent, kind, roundText, callId] = match;
    const round = this.round(wake, Number(agent), Number(roundText));
    if (kind === 'model') round.model = result;
    else round.tools.set(callId, result);
  }

  triggers(wake) {
    const found = [];
    for (let pos = wake.from + 1; pos <= wake.to; pos += 1) {
      const event = this.byPos.get(pos);
      if (event && !event.cancelled) found.push(event);
    }
    return found;
  }

  // Inbox messages no known wake covers yet (queued, or being taken by a wake that has not
  // written anything).
  queued() {
    const found = [];
    for (let i = this.inbox.length - 1; i >= 0 && this.inbox[i] > this.covered; i -= 1) {
      const event = this.byPos.get(this.inbox[i]);
      if (!event.cancelled) found.unshift(event);
    }
    return found;
  }

  sortedWakes() {
    return [...this.wakes.values()].sort((a, b) => a.from - b.from || a.to - b.to);
  }
}

// A wake's status: its `runs` record's, or 'running' while it has written only live events.
export function wakeStatus(wake) {
  return wake.run ? wake.run.status : 'running';
}

// The text a round of an agent shows: the model's answer once recorded, else the deltas so far.
export function roundText(round) {
  if (round.model) return { text: round.model.text || '', live: false };
  const seqs = [...round.deltas.keys()].sort((a, b) => a - b);
  return { text: seqs.map((s) => round.deltas.get(s)).join(''), live: true };
}

// The reasoning a round shows: recorded once the round is, else the streamed deltas so far.
export function roundReasoning(round) {
  if (round.reasoning !== null) return { text: round.reasoning, live: false };
  if (round.model && round.model.reasoning) return { text: round.model.reasoning, live: false };
  const seqs = [...round.thoughts.keys()].sort((a, b) => a - b);
  return { text: seqs.map((s) => round.thoughts.get(s)).join(''), live: !round.model };
}

// The tool calls of a round, in the model's order: [{id, name, arguments, outcome}].
export function roundCalls(round) {
  const asked = round.model ? round.model.tool_calls || [] : [];
  const calls = asked.map((c) => ({ id: c.id, name: c.name, arguments: c.arguments }));
  for (const [id, outcome] of round.tools) {
    if (!calls.some((c) => c.id === id)) {
      calls.push({ id, name: outcome.name, arguments: outcome.arguments });
    }
  }
  return calls.map((c) => ({ ...c, outcome: round.tools.get(c.id) || null }));
}

// A message payload as chat text.
export function messageText(payload) {
  if (typeof payload === 'string') return payload;
  if (payload && typeof payload === 'object' && typeof payload.text === 'string') {
    return payload.text;
  }
  return JSON.stringify(payload);
}

// One line saying what a trigger event is.
export function describeTrigger(event) {
  const value = event.value || {};
  switch (event.type) {
    case 'inbox':
      return `message${value.message_type ? ` (${value.message_type})` : ''} from ${
        value.from || 'spawn'}${value.edited ? ' (edited)' : ''}: ${messageText(value.payload)}`;
    case 'entity_created':
      return 'created';
    case 'signals':
      return `signal ${value.signal || ''}`;
    case 'wakes': {
      if (value.kind === 'child_finished' && value.finished_child) {
        const child = value.finished_child;
        return `child ${child.url} finished (${child.run_status})`;
      }
      return `${value.kind || 'wake'}${value.source ? ` from ${value.source}` : ''}`;
    }
    default:
      return event.type;
  }
}
