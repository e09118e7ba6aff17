// Tests the websocket client against a scripted fake socket: routing, cancel, reconnect, fail-fast while the server is down.

import type { ServerConnection } from '@jupyterlab/services';
import { CodeLlamaClient, CONNECTION_LOST, reconnectDelay } from '../client';
import { PendingRequests } from '../pending';

class FakeSocket {
  static instances: FakeSocket[] = [];
  readyState = 0;
  sent: any[] = [];
  onopen: (() => void) | null = null;
  onclose: (() => void) | null = null;
  onmessage: ((event: { data: string }) => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.instances.push(this);
  }

  send(data: string): void {
    this.sent.push(JSON.parse(data));
  }

  close(): void {
    this.serverCloses();
  }

  open(): void {
    this.readyState = 1;
    this.onopen?.();
  }

  receive(message: object): void {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  serverCloses(): void {
    this.readyState = 3;
    this.onclose?.();
  }
}

function makeClient(now: () => number = () => 0): CodeLlamaClient {
  const settings = {
    baseUrl: 'http://localhost:8888/lab-base/',
    wsUrl: 'ws://localhost:8888/lab-base/',
    token: 'secret',
    appendToken: true,
    WebSocket: FakeSocket as unknown as typeof WebSocket,
    init: {},
    fetch: () => Promise.reject(new Error('no REST in this test'))
  } as unknown as ServerConnection.ISettings;
  return new CodeLlamaClient({ serverSettings: settings, pollStatus: false, now });
}

beforeEach(() => {
  FakeSocket.instances = [];
});

describe('CodeLlamaClient.stream', () => {
  it('opens one socket under the base URL with the token, and queues until open', () => {
    const client = makeClient();
    client.stream({ prefix: 'a', suffix: '' });
    client.stream({ prefix: 'b', suffix: '' });
    expect(FakeSocket.instances).toHaveLength(1);
    const socket = FakeSocket.instances[0];
    expect(socket.url).toBe('ws://localhost:8888/lab-base/codellama/ws?token=secret');
    expect(socket.sent).toEqual([]);
    socket.open();
    expect(socket.sent.map(m => [m.type, m.prefix])).toEqual([
      ['complete', 'a'],
      ['complete', 'b']
    ]);
  });

  it('delivers chunks with the running text and resolves on done', async () => {
    const client = makeClient();
    const seen: string[] = [];
    const stream = client.stream({ prefix: 'x', suffix: '' }, (delta, soFar) =>
      seen.push(`${delta}|${soFar}`)
    );
    const socket = FakeSocket.instances[0];
    socket.open();
    expect(client.activeRequests).toBe(1);
    socket.receive({ type: 'chunk', id: stream.id, text: 'ab' });
    socket.receive({ type: 'chunk', id: 'someone-else', text: 'zz' });
    socket.receive({ type: 'chunk', id: stream.id, text: 'c' });
    socket.receive({
      type: 'done',
      id: stream.id,
      text: 'abc',
      choices: ['abc'],
      usage: {},
      timings: {}
    });
    await expect(stream.done).resolves.toMatchObject({ text: 'abc' });
    expect(seen).toEqual(['ab|ab', 'c|abc']);
    expect(client.activeRequests).toBe(0);
  });

  it('sends cancel once and stops sending it after the request ended', async () => {
    const client = makeClient();
    const stream = client.stream({ prefix: 'x', suffix: '' });
    const socket = FakeSocket.instances[0];
    socket.open();
    stream.cancel();
    expect(socket.sent[socket.sent.length - 1]).toEqual({ type: 'cancel', id: stream.id });
    socket.receive({
      type: 'done',
      id: stream.id,
      text: '',
      choices: [],
      usage: {},
      timings: {},
      cancelled: true
    });
    await expect(stream.done).resolves.toMatchObject({ cancelled: true });
    stream.cancel();
    expect(socket.sent.filter(m => m.type === 'cancel')).toHaveLength(1);
  });

  it('rejects on a server error message', async () => {
    const client = makeClient();
    const stream = client.stream({ prefix: 'x', suffix: '' });
    FakeSocket.instances[0].open();
    FakeSocket.instances[0].receive({ type: 'error', id: stream.id, message: 'bad offset' });
    await expect(stream.done).rejects.toThrow('bad offset');
    expect(client.lastFailure).toBe('bad offset'); // for the status bar: typing shows no error
    const answered = async (cancelled: boolean) => {
      const request = client.stream({ prefix: 'x', suffix: '' });
      const done = { type: 'done', id: request.id, text: '', choices: [], usage: {}, timings: {} };
      FakeSocket.instances[0].receive({ ...done, cancelled });
      await request.done;
    };
    await answered(true);
    expect(client.lastFailure).toBe('bad offset'); // a cancelled request proves nothing
    await answered(false);
    expect(client.lastFailure).toBeNull();
  });

  it('fails requests in flight when the socket closes, and reconnects on the next request', async () => {
    const client = makeClient();
    const first = client.stream({ prefix: 'x', suffix: '' });
    FakeSocket.instances[0].open();
    FakeSocket.instances[0].serverCloses();
    await expect(first.done).rejects.toThrow(CONNECTION_LOST);
    const second = client.stream({ prefix: 'y', suffix: '' });
    expect(FakeSocket.instances).toHaveLength(2);
    FakeSocket.instances[1].open();
    expect(FakeSocket.instances[1].sent[0]).toMatchObject({
      type: 'complete',
      id: second.id,
      prefix: 'y'
    });
  });

  it('fails fast instead of reconnecting on every request while the server is down', async () => {
    let now = 1000;
    const client = makeClient(() => now);
    const first = client.stream({ prefix: 'x', suffix: '' });
    FakeSocket.instances[0].serverCloses(); // never opened: a failed attempt
    await expect(first.done).rejects.toThrow(CONNECTION_LOST);
    const second = client.stream({ prefix: 'y', suffix: '' });
    await expect(second.done).rejects.toThrow(/unreachable/);
    expect(FakeSocket.instances).toHaveLength(1);
    now += reconnectDelay(1);
    client.stream({ prefix: 'z', suffix: '' });
    expect(FakeSocket.instances).toHaveLength(2);
  });
});

describe('CodeLlamaClient.cancel', () => {
  it("opens the tab's socket to cancel another connection's request by id", () => {
    const client = makeClient();
    client.cancel('magic-0123456789abcdef');
    expect(FakeSocket.instances).toHaveLength(1);
    const socket = FakeSocket.instances[0];
    socket.open();
    expect(socket.sent).toEqual([{ type: 'cancel', id: 'magic-0123456789abcdef' }]);
    expect(client.activeRequests).toBe(0);
  });

  it('sends at once on an open socket, beside the streams of this tab', () => {
    const client = makeClient();
    const stream = client.stream({ prefix: 'x', suffix: '' });
    const socket = FakeSocket.instances[0];
    socket.open();
    client.cancel('magic-1');
    expect(socket.sent.map(m => [m.type, m.id])).toEqual([
      ['complete', stream.id],
      ['cancel', 'magic-1']
    ]);
    expect(FakeSocket.instances).toHaveLength(1);
  });
});

describe('reconnectDelay', () => {
  it('grows from nothing to a cap', () => {
    expect(reconnectDelay(0)).toBe(0);
    expect(reconnectDelay(1)).toBe(500);
    expect(reconnectDelay(2)).toBe(1000);
    expect(reconnectDelay(20)).toBe(30000);
  });
});

describe('PendingRequests', () => {
  it('ends a request at its first final message and ignores late ones', () => {
    const pending = new PendingRequests();
    const events: string[] = [];
    pending.add('1', {
      onChunk: d => events.push(`chunk ${d}`),
      onDone: m => events.push(`done ${m.text}`),
      onError: m => events.push(`error ${m}`)
    });
    expect(pending.dispatch({ type: 'chunk', id: '1', text: 'a' })).toBe(true);
    pending.dispatch({ type: 'done', id: '1', text: 'a', choices: ['a'], usage: {}, timings: {} });
    expect(pending.dispatch({ type: 'chunk', id: '1', text: 'late' })).toBe(false);
    expect(events).toEqual(['chunk a', 'done a']);
    expect(pending.size).toBe(0);
  });

  it('refuses duplicate ids and fails everything at once', () => {
    const pending = new PendingRequests();
    const errors: string[] = [];
    const handlers = {
      onChunk: () => {},
      onDone: () => {},
      onError: (m: string) => errors.push(m)
    };
    pending.add('1', handlers);
    expect(() => pending.add('1', handlers)).toThrow();
    pending.add('2', handlers);
    pending.failAll('gone');
    expect(errors).toEqual(['gone', 'gone']);
  });
});
