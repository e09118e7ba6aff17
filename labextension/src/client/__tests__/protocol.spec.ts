// Tests that server messages and status replies are validated into well-formed objects, never exceptions.

import { parseServerMessage, parseServerStatus } from '../protocol';

describe('parseServerMessage', () => {
  it('reads chunk, done and error messages', () => {
    expect(parseServerMessage('{"type":"chunk","id":"a","text":"de"}')).toEqual({
      type: 'chunk',
      id: 'a',
      text: 'de'
    });
    expect(
      parseServerMessage(
        JSON.stringify({
          type: 'done',
          id: 'a',
          text: 'x',
          choices: ['x', 'y'],
          usage: { n: 1 },
          timings: {}
        })
      )
    ).toEqual({
      type: 'done',
      id: 'a',
      text: 'x',
      choices: ['x', 'y'],
      usage: { n: 1 },
      timings: {}
    });
    expect(parseServerMessage('{"type":"error","id":"a","message":"boom"}')).toEqual({
      type: 'error',
      id: 'a',
      message: 'boom'
    });
  });

  it('keeps the cancelled flag and fills missing choices with the text', () => {
    expect(parseServerMessage('{"type":"done","id":"a","text":"ab","cancelled":true}')).toEqual({
      type: 'done',
      id: 'a',
      text: 'ab',
      choices: ['ab'],
      usage: {},
      timings: {},
      cancelled: true
    });
  });

  it.each([
    'not json',
    '[]',
    '{"type":"chunk","text":"no id"}',
    '{"type":"chunk","id":"a"}',
    '{"type":"pong","id":"a"}',
    'null'
  ])('rejects %s', raw => {
    expect(parseServerMessage(raw)).toBeNull();
  });
});

describe('parseServerStatus', () => {
  it('reads a ready status', () => {
    const status = parseServerStatus({
      state: 'ready',
      model: {
        name: 'tiny',
        supports_infilling: true,
        max_context: 2048,
        device: 'cpu',
        dtype: 'float32',
        quant: 'int8'
      },
      error: null
    });
    expect(status).toEqual({
      state: 'ready',
      model: {
        name: 'tiny',
        supports_infilling: true,
        max_context: 2048,
        device: 'cpu',
        dtype: 'float32',
        quant: 'int8'
      },
      error: null
    });
  });

  it('turns malformed replies into an error state with a reason', () => {
    expect(parseServerStatus('oops').state).toBe('error');
    const odd = parseServerStatus({ state: 'sleeping', model: null });
    expect(odd.state).toBe('error');
    expect(odd.error).toContain('sleeping');
  });
});
