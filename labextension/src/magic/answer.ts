// The %%codellama answer's MIME data read defensively, and what its view should show in each state.

/** The MIME type the magic publishes; its contract is in jupyter_codellama/magic.py. */
export const ANSWER_MIME_TYPE = 'application/vnd.jupyter-codellama.answer+json';

export interface IAnswer {
  /** The answer as a cell's source: for a <FILL> cell the whole cell, filled in. */
  code: string;
  done: boolean;
  cancelled: boolean;
  /** Why the text ended, in the server protocol's words; empty while streaming or when not said. */
  finishReason: string;
  tokens: number;
  tokensPerSecond: number;
  model: string;
  requestId: string;
  kind: 'instruction' | 'fill';
  /** Where the model runs; only 'server' requests can be stopped over the websocket. */
  backend: string;
  error: string | null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function count(value: unknown): number {
  return typeof value === 'number' && Number.isFinite(value) && value > 0 ? value : 0;
}

/**
 * Read the magic's MIME data; null when it has no code to show at all. Unknown fields are ignored
 * and missing ones take harmless defaults, so an older or newer magic still renders.
 */
export function parseAnswer(data: unknown): IAnswer | null {
  if (!isRecord(data) || typeof data.code !== 'string') {
    return null;
  }
  const error = typeof data.error === 'string' && data.error.trim() ? data.error : null;
  return {
    code: data.code,
    // An error ends the answer even if a faulty sender forgot to say so.
    done: data.done === true || error !== null,
    cancelled: data.cancelled === true,
    finishReason: typeof data.finish_reason === 'string' ? data.finish_reason : '',
    tokens: Math.round(count(data.tokens)),
    tokensPerSecond: count(data.tokens_per_second),
    model: typeof data.model === 'string' ? data.model : '',
    requestId: typeof data.request_id === 'string' ? data.request_id : '',
    kind: data.kind === 'fill' ? 'fill' : 'instruction',
    backend: typeof data.backend === 'string' ? data.backend : '',
    error
  };
}

export type AnswerState = 'streaming' | 'stopping' | 'done' | 'cancelled' | 'error';

export interface IAnswerView {
  state: AnswerState;
  /** Model, progress and state in one line, e.g. "CodeLlama-7b · 12 tokens · 40.1 tokens/s · done". */
  status: string;
  /** The failure in one line, or null. */
  error: string | null;
  /** Whether Insert below and Replace this cell act now. */
  canEdit: boolean;
  /**
   * Whether Copy does: whenever there is code, even mid-answer, since copying changes nothing; an
   * answer whose kernel died while writing stays unfinished, and its code must not be locked away.
   */
  canCopy: boolean;
  /** Why they do not, for their tooltip; empty when they do. */
  editBlocked: string;
  showStop: boolean;
  canStop: boolean;
}

const MAX_ERROR_CHARS = 300;

/** The first non-empty line of an error, shortened: the output area is no place for a traceback. */
export function oneLine(message: string): string {
  const line =
    message
      .split('\n')
      .map(part => part.trim())
      .find(part => part.length > 0) ?? '';
  return line.length > MAX_ERROR_CHARS ? `${line.slice(0, MAX_ERROR_CHARS - 1)}…` : line;
}

/** Finish reasons that end an answer where the model had not: the code may stop mid-statement. */
const CUT_OFF_WORDS = new Map([
  ['length', 'cut off at the token limit'],
  ['deadline', "cut off at the server's time limit"]
]);

const STATE_WORDS: Record<AnswerState, string> = {
  streaming: 'writing…',
  stopping: 'stopping…',
  done: 'done',
  cancelled: 'stopped',
  error: 'failed'
};

/**
 * What the view shows for `answer`; `stopRequested` is whether Stop was clicked in this view, which
 * the data cannot say until the server confirms the stop with a cancelled final update.
 */
export function describeAnswer(answer: IAnswer, stopRequested = false): IAnswerView {
  let state: AnswerState;
  if (answer.error !== null) {
    state = 'error';
  } else if (answer.done) {
    state = answer.cancelled ? 'cancelled' : 'done';
  } else {
    state = stopRequested ? 'stopping' : 'streaming';
  }
  const parts = [
    answer.model,
    `${answer.tokens} token${answer.tokens === 1 ? '' : 's'}`,
    `${answer.tokensPerSecond.toFixed(1)} tokens/s`,
    (state === 'done' && CUT_OFF_WORDS.get(answer.finishReason)) || STATE_WORDS[state]
  ].filter(part => part.length > 0);

  let editBlocked = '';
  if (state === 'error') {
    editBlocked = 'The request failed';
  } else if (!answer.done) {
    editBlocked = 'Available when the answer is complete';
  } else if (!answer.code.trim()) {
    editBlocked = 'The answer is empty';
  }
  const stoppable = !answer.done && answer.backend === 'server' && answer.requestId !== '';
  return {
    state,
    status: parts.join(' · '),
    error: answer.error === null ? null : oneLine(answer.error),
    canEdit: editBlocked === '',
    canCopy: state !== 'error' && answer.code.trim() !== '',
    editBlocked,
    showStop: stoppable,
    canStop: stoppable && !stopRequested
  };
}
