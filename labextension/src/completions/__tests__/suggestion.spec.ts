// Tests streaming reconciliation: what the ghost text shows as chunks arrive and the user types, and when the server is told to cancel.

import type { ICompletionRequest, IDoneMessage } from '../../client/protocol';
import type { ICompletionStream } from '../../tokens';
import { LiveSuggestion } from '../suggestion';

/** A stand-in for the client whose server the test drives by hand. */
class ScriptedServer {
  requests: ICompletionRequest[] = [];
  cancels = 0;
  private _onChunk: (delta: string, soFar: string) => void = () => {};
  private _soFar = '';
  private _resolve: (m: IDoneMessage) => void = () => {};
  private _reject: (e: Error) => void = () => {};

  stream = (
    request: ICompletionRequest,
    onChunk?: (delta: string, soFar: string) => void
  ): ICompletionStream => {
    this.requests.push(request);
    this._onChunk = onChunk ?? (() => {});
    const done = new Promise<IDoneMessage>((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    return { id: 'r1', done, cancel: () => this.cancels++ };
  };

  chunk(delta: string): void {
    this._soFar += delta;
    this._onChunk(delta, this._soFar);
  }

  done(text: string, choices: string[] = [text], cancelled = false): void {
    this._resolve({ type: 'done', id: 'r1', text, choices, usage: {}, timings: {}, cancelled });
  }

  fail(message: string): void {
    this._reject(new Error(message));
  }
}

const tick = () => new Promise(resolve => setTimeout(resolve, 0));

function setup(candidates = 1) {
  const server = new ScriptedServer();
  const editor = { text: 'x = fo\n' };
  const suggestion = new LiveSuggestion({
    client: server,
    request: { prefix: 'x = fo', suffix: '\n' },
    snapshot: { before: 'x = fo', after: '\n' },
    readText: () => editor.text,
    candidates
  });
  const type = (typed: string) => {
    editor.text = `x = fo${typed}\n`;
    suggestion.noteEditorChange();
  };
  return { server, editor, suggestion, type };
}

async function collect(generator: AsyncGenerator<string>, into: string[]): Promise<void> {
  for await (const text of generator) {
    into.push(text);
  }
}

describe('LiveSuggestion', () => {
  it('is ready at the first chunk and streams the accumulated text', async () => {
    const { server, suggestion } = setup();
    let ready = false;
    void suggestion.ready().then(() => (ready = true));
    await tick();
    expect(ready).toBe(false);
    server.chunk('o(');
    await tick();
    expect(ready).toBe(true);

    const shown: string[] = [];
    const streaming = collect(suggestion.updates(0), shown);
    await tick();
    server.chunk('1)');
    await tick();
    server.done('o(1)');
    await streaming;
    expect(shown).toEqual(['o(', 'o(1)']);
  });

  it('shows only what is left after the user typed along', async () => {
    const { server, suggestion, type } = setup();
    server.chunk('o_bar');
    const shown: string[] = [];
    const streaming = collect(suggestion.updates(0), shown);
    await tick();
    type('o_');
    server.chunk('(2)');
    await tick();
    server.done('o_bar(2)');
    await streaming;
    expect(shown).toEqual(['o_bar', 'bar(2)']);
    expect(server.cancels).toBe(0);
  });

  it('cancels on the server as soon as the user types past the suggestion, and ends the stream', async () => {
    const { server, suggestion, type } = setup();
    server.chunk('o_bar');
    const shown: string[] = [];
    const streaming = collect(suggestion.updates(0), shown);
    await tick();
    type('x');
    expect(server.cancels).toBe(1);
    server.chunk('(2)'); // a chunk already on the wire
    type('xy');
    expect(server.cancels).toBe(1);
    server.done('o_bar(2)', ['o_bar(2)'], true);
    await streaming;
    expect(shown).toEqual(['o_bar']);
    expect(suggestion.cancelled).toBe(true);
  });

  it('is no longer followed once cancelled, even with nothing left to show', () => {
    const { server, suggestion, type } = setup();
    server.chunk('o(');
    type('o('); // all that was shown, accepted with Tab while the model still writes
    expect(suggestion.isFollowed()).toBe(true);
    suggestion.cancel();
    expect(suggestion.isFollowed()).toBe(false); // a fresh request may take over at the cursor
  });

  it('settles only when every candidate is whole', async () => {
    const { server, suggestion } = setup(3);
    let settled = false;
    void suggestion.settled().then(() => (settled = true));
    server.chunk('o(');
    await tick();
    expect(settled).toBe(false);
    server.done('o(1)', ['o(1)', 'o(2)', 'o(3)']);
    await tick();
    expect(settled).toBe(true);
    expect(suggestion.remaining(2)).toBe('o(3)');
  });

  it('waits while the user is ahead of generation, then continues when it catches up', async () => {
    const { server, suggestion, type } = setup();
    server.chunk('o');
    type('o_b');
    expect(server.cancels).toBe(0);
    expect(suggestion.isFollowed()).toBe(true);
    const shown: string[] = [];
    const streaming = collect(suggestion.updates(0), shown);
    server.chunk('_bar');
    await tick();
    server.done('o_bar');
    await streaming;
    expect(shown).toEqual(['ar']);
  });

  it('cancels when the first text to arrive contradicts what the user typed meanwhile', () => {
    const { server, type } = setup();
    type('x');
    expect(server.cancels).toBe(0); // nothing generated yet: the model may still write 'x'
    server.chunk('o');
    expect(server.cancels).toBe(1);
  });

  it('is not followed once the user typed all of a finished suggestion', async () => {
    const { server, suggestion, type } = setup();
    server.chunk('o');
    server.done('o');
    await tick();
    expect(suggestion.isFollowed()).toBe(true);
    type('o');
    expect(suggestion.isFollowed()).toBe(false);
  });

  it('fills the other candidates from the final message', async () => {
    const { server, suggestion } = setup(3);
    server.chunk('o1');
    server.done('o1', ['o1', 'o2', 'o3']);
    await tick();
    expect([0, 1, 2].map(i => suggestion.remaining(i))).toEqual(['o1', 'o2', 'o3']);
  });

  it('reports an error and becomes ready instead of hanging', async () => {
    const { server, suggestion } = setup();
    server.fail('model crashed');
    await suggestion.ready();
    expect(suggestion.error).toBe('model crashed');
    expect(suggestion.finished).toBe(true);
  });

  it('sends cancel at most once', () => {
    const { server, suggestion } = setup();
    suggestion.cancel();
    suggestion.cancel();
    expect(server.cancels).toBe(1);
  });
});
