// Tests reading the magic's MIME data and the state each answer shows: streaming, stopping, done, stopped, failed.

import { IAnswer, describeAnswer, oneLine, parseAnswer } from '../answer';

const streaming = {
  code: 'import pandas as pd\n',
  done: false,
  cancelled: false,
  tokens: 7,
  tokens_per_second: 31.25,
  model: 'CodeLlama-7b-Instruct-hf',
  request_id: 'magic-0123456789abcdef',
  kind: 'instruction',
  backend: 'server',
  error: null
};

function answer(fields: Record<string, unknown> = {}): IAnswer {
  const parsed = parseAnswer({ ...streaming, ...fields });
  if (!parsed) {
    throw new Error('test data did not parse');
  }
  return parsed;
}

describe('parseAnswer', () => {
  it('reads every field of the contract', () => {
    expect(parseAnswer(streaming)).toEqual({
      code: 'import pandas as pd\n',
      done: false,
      cancelled: false,
      finishReason: '',
      tokens: 7,
      tokensPerSecond: 31.25,
      model: 'CodeLlama-7b-Instruct-hf',
      requestId: 'magic-0123456789abcdef',
      kind: 'instruction',
      backend: 'server',
      error: null
    });
  });

  it('needs code and nothing else; unknown fields are ignored', () => {
    expect(parseAnswer({ code: 'x = 1', future_field: [1, 2] })).toEqual({
      code: 'x = 1',
      done: false,
      cancelled: false,
      finishReason: '',
      tokens: 0,
      tokensPerSecond: 0,
      model: '',
      requestId: '',
      kind: 'instruction',
      backend: '',
      error: null
    });
    expect(parseAnswer({ done: true })).toBeNull();
    expect(parseAnswer('x = 1')).toBeNull();
    expect(parseAnswer(null)).toBeNull();
    expect(parseAnswer([streaming])).toBeNull();
  });

  it('replaces nonsense counts with zero and keeps fill answers', () => {
    const parsed = parseAnswer({
      code: 'a',
      tokens: -3,
      tokens_per_second: 'fast',
      kind: 'fill'
    });
    expect(parsed).toMatchObject({ tokens: 0, tokensPerSecond: 0, kind: 'fill' });
    expect(parseAnswer({ code: 'a', tokens: Number.NaN })?.tokens).toBe(0);
  });

  it('treats an error as the end of the answer', () => {
    expect(parseAnswer({ code: '', done: false, error: 'model went away' })).toMatchObject({
      done: true,
      error: 'model went away'
    });
    expect(parseAnswer({ code: '', error: '  ' })?.error).toBeNull();
  });
});

describe('describeAnswer', () => {
  it('streams with Stop, no edits yet, and Copy of what is written so far', () => {
    expect(describeAnswer(answer())).toEqual({
      state: 'streaming',
      status: 'CodeLlama-7b-Instruct-hf · 7 tokens · 31.3 tokens/s · writing…',
      error: null,
      canEdit: false,
      canCopy: true,
      editBlocked: 'Available when the answer is complete',
      showStop: true,
      canStop: true
    });
  });

  it('shows the stop as pending until the server confirms it', () => {
    expect(describeAnswer(answer(), true)).toMatchObject({
      state: 'stopping',
      showStop: true,
      canStop: false,
      canEdit: false
    });
    expect(describeAnswer(answer({ done: true, cancelled: true }), true)).toMatchObject({
      state: 'cancelled',
      showStop: false,
      canEdit: true
    });
  });

  it('offers no Stop where the model runs in the kernel or the id is unknown', () => {
    expect(describeAnswer(answer({ backend: 'kernel' }))).toMatchObject({
      state: 'streaming',
      showStop: false,
      canStop: false
    });
    expect(describeAnswer(answer({ request_id: '' })).showStop).toBe(false);
  });

  it('enables the edits once done, also on the partial code of a stopped answer', () => {
    expect(describeAnswer(answer({ done: true, tokens: 1 }))).toMatchObject({
      state: 'done',
      status: 'CodeLlama-7b-Instruct-hf · 1 token · 31.3 tokens/s · done',
      canEdit: true,
      editBlocked: '',
      showStop: false
    });
    expect(describeAnswer(answer({ done: true, cancelled: true }))).toMatchObject({
      state: 'cancelled',
      canEdit: true
    });
    expect(describeAnswer(answer({ done: true, code: ' \n' }))).toMatchObject({
      canEdit: false,
      editBlocked: 'The answer is empty'
    });
  });

  it('says when the answer was cut off, and still lets the user take the partial code', () => {
    expect(describeAnswer(answer({ done: true, finish_reason: 'length' }))).toMatchObject({
      state: 'done',
      status: 'CodeLlama-7b-Instruct-hf · 7 tokens · 31.3 tokens/s · cut off at the token limit',
      canEdit: true
    });
    expect(describeAnswer(answer({ done: true, finish_reason: 'deadline' })).status).toContain(
      "cut off at the server's time limit"
    );
    expect(describeAnswer(answer({ done: true, finish_reason: 'end' })).status).toMatch(/· done$/);
    const odd = describeAnswer(answer({ done: true, finish_reason: 'constructor' }));
    expect(odd.status).toMatch(/· done$/); // a word from the data, not the lookup's prototype
  });

  it('shows an error as one line and blocks the edits', () => {
    const view = describeAnswer(
      answer({
        done: true,
        code: 'partial',
        error: '\nthe server could not answer: boom\nTraceback…'
      })
    );
    expect(view).toMatchObject({
      state: 'error',
      error: 'the server could not answer: boom',
      canEdit: false,
      canCopy: false,
      editBlocked: 'The request failed',
      showStop: false
    });
    expect(view.status.endsWith('failed')).toBe(true);
  });

  it('leaves out a missing model name rather than showing an empty field', () => {
    expect(describeAnswer(answer({ model: '', done: true })).status).toBe(
      '7 tokens · 31.3 tokens/s · done'
    );
  });
});

describe('oneLine', () => {
  it('keeps the first non-empty line and shortens long ones', () => {
    expect(oneLine('\n  first  \nsecond')).toBe('first');
    const long = oneLine('x'.repeat(1000));
    expect(long).toHaveLength(300);
    expect(long.endsWith('…')).toBe(true);
    expect(oneLine('')).toBe('');
  });
});
