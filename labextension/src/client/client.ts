// The browser tab's one connection to the Code Llama server: a lazily (re)opened websocket for streams, REST for status and one-shot completions.

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { Signal } from '@lumino/signaling';
import type { ICodeLlamaClient, ICompletionStream } from '../tokens';
import { PendingRequests } from './pending';
import {
  ClientMessage,
  ICompletionRequest,
  ICompletionResult,
  IDoneMessage,
  IServerStatus,
  parseServerMessage,
  parseServerStatus
} from './protocol';

const API_PATH = 'codellama';

/**
 * How soon to ask for the status again after each state: soon while the model loads, so "ready"
 * shows promptly; soon after an error, so "ready" returns within seconds of a recovery; seldom once settled.
 */
const STATUS_POLL_MS: Record<IServerStatus['state'], number> = {
  loading: 2000,
  error: 5000,
  ready: 30000
};

/**
 * Wait before the next connection attempt after `failures` failed ones in a row.
 * Requests inside that window fail at once instead of each retrying, so a stopped
 * server costs one console error per window rather than one per keystroke.
 */
export function reconnectDelay(failures: number): number {
  if (failures <= 0) {
    return 0;
  }
  return Math.min(30000, 500 * 2 ** (failures - 1));
}

export const CONNECTION_LOST = 'Connection to the Code Llama server was lost';

export class CodeLlamaClient implements ICodeLlamaClient {
  constructor(options: CodeLlamaClient.IOptions = {}) {
    this._settings = options.serverSettings ?? ServerConnection.makeSettings();
    this._now = options.now ?? (() => Date.now());
    if (options.pollStatus ?? true) {
      this._scheduleStatusPoll(0);
    }
  }

  get status(): IServerStatus | null {
    return this._status;
  }

  get statusChanged(): Signal<this, IServerStatus | null> {
    return this._statusChanged;
  }

  get activeRequests(): number {
    return this._active;
  }

  get activityChanged(): Signal<this, number> {
    return this._activityChanged;
  }

  get lastFailure(): string | null {
    return this._lastFailure;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    if (this._pollTimer !== undefined) {
      clearTimeout(this._pollTimer);
    }
    this._pending.failAll('Client disposed');
    this._socket?.close();
    this._socket = null;
    Signal.clearData(this);
  }

  async refreshStatus(): Promise<IServerStatus> {
    let status: IServerStatus;
    try {
      const reply = await this._request('status', { method: 'GET' });
      status = parseServerStatus(reply);
    } catch (reason) {
      status = {
        state: 'error',
        model: null,
        error: `Cannot reach the Code Llama server: ${errorText(reason)}`
      };
    }
    if (JSON.stringify(status) !== JSON.stringify(this._status)) {
      this._status = status;
      this._statusChanged.emit(status);
    }
    return status;
  }

  async complete(request: ICompletionRequest): Promise<ICompletionResult> {
    this._changeActivity(+1);
    try {
      const reply = (await this._request('complete', {
        method: 'POST',
        body: JSON.stringify(request)
      })) as ICompletionResult;
      return {
        ...reply,
        choices: reply.choices?.length ? reply.choices : [reply.text]
      };
    } finally {
      this._changeActivity(-1);
    }
  }

  stream(
    request: ICompletionRequest,
    onChunk?: (delta: string, textSoFar: string) => void
  ): ICompletionStream {
    const id = `${this._idPrefix}-${++this._counter}`;
    let textSoFar = '';
    let settled = false;
    const done = new Promise<IDoneMessage>((resolve, reject) => {
      const settle = () => {
        settled = true;
        this._changeActivity(-1);
      };
      this._pending.add(id, {
        onChunk: delta => {
          textSoFar += delta;
          onChunk?.(delta, textSoFar);
        },
        onDone: message => {
          if (message.cancelled !== true) {
            this._lastFailure = null; // only an answer shows the failure is over
          }
          settle();
          resolve(message);
        },
        onError: message => {
          this._lastFailure = message;
          settle();
          reject(new Error(message));
        }
      });
    });
    this._changeActivity(+1);
    this._send({ type: 'complete', id, ...request });
    return {
      id,
      done,
      cancel: () => {
        if (!settled && this._pending.has(id)) {
          this._send({ type: 'cancel', id });
        }
      }
    };
  }

  cancel(id: string): void {
    this._send({ type: 'cancel', id }, true);
  }

  /** `connectForCancel`: the cancel is for a request of another connection, so ours must exist to send it. */
  private _send(message: ClientMessage, connectForCancel = false): void {
    const socket = this._socket;
    if (socket && socket.readyState === WS_OPEN) {
      socket.send(JSON.stringify(message));
      return;
    }
    if (message.type === 'cancel' && !socket && !connectForCancel) {
      // Nothing of ours to cancel on a server we are not connected to.
      return;
    }
    this._outbox.push(message);
    if (!socket) {
      this._connect();
    }
  }

  private _connect(): void {
    const wait = this._lastFailureAt + reconnectDelay(this._failures);
    if (this._failures > 0 && this._now() < wait) {
      this._outbox = [];
      this._pending.failAll('The Code Llama server is unreachable; retrying shortly');
      return;
    }
    const settings = this._settings;
    let url = URLExt.join(settings.wsUrl, API_PATH, 'ws');
    if (settings.appendToken && settings.token !== '') {
      url += `?token=${encodeURIComponent(settings.token)}`;
    }
    const socket = new settings.WebSocket(url);
    this._socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this._failures = 0;
      const queued = this._outbox;
      this._outbox = [];
      for (const message of queued) {
        socket.send(JSON.stringify(message));
      }
      if (this._hadConnection) {
        // The server restarted or the network came back: its model state may differ.
        void this.refreshStatus();
      }
      this._hadConnection = true;
    };
    socket.onmessage = event => {
      const message = parseServerMessage(event.data);
      if (message) {
        this._pending.dispatch(message);
      }
    };
    socket.onclose = () => {
      if (this._socket !== socket) {
        return;
      }
      this._socket = null;
      this._outbox = [];
      if (!opened) {
        this._failures += 1;
        this._lastFailureAt = this._now();
      }
      this._pending.failAll(CONNECTION_LOST);
      if (!this._disposed) {
        void this.refreshStatus();
      }
    };
  }

  private async _request(path: string, init: RequestInit): Promise<unknown> {
    const url = URLExt.join(this._settings.baseUrl, API_PATH, path);
    const response = await ServerConnection.makeRequest(url, init, this._settings);
    let data: unknown = null;
    try {
      data = await response.json();
    } catch {
      // A non-JSON body is reported through the status code below.
    }
    if (!response.ok) {
      const serverError =
        typeof data === 'object' && data !== null && 'error' in data
          ? String((data as { error: unknown }).error)
          : response.statusText;
      throw new Error(`${response.status}: ${serverError}`);
    }
    return data;
  }

  private _scheduleStatusPoll(delay: number): void {
    this._pollTimer = setTimeout(async () => {
      if (this._disposed) {
        return;
      }
      const status = await this.refreshStatus();
      if (!this._disposed) {
        this._scheduleStatusPoll(STATUS_POLL_MS[status.state]);
      }
    }, delay);
  }

  private _changeActivity(delta: number): void {
    this._active += delta;
    this._activityChanged.emit(this._active);
  }

  private _lastFailure: string | null = null;
  private readonly _settings: ServerConnection.ISettings;
  private readonly _now: () => number;
  private readonly _pending = new PendingRequests();
  private readonly _idPrefix = Math.random().toString(36).slice(2, 10);
  private readonly _statusChanged = new Signal<this, IServerStatus | null>(this);
  private readonly _activityChanged = new Signal<this, number>(this);
  private _socket: WebSocket | null = null;
  private _outbox: ClientMessage[] = [];
  private _counter = 0;
  private _active = 0;
  private _failures = 0;
  private _lastFailureAt = 0;
  private _hadConnection = false;
  private _status: IServerStatus | null = null;
  private _pollTimer: ReturnType<typeof setTimeout> | undefined;
  private _disposed = false;
}

/** WebSocket.OPEN, spelled out because tests run where the global WebSocket may not exist. */
const WS_OPEN = 1;

function errorText(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}

export namespace CodeLlamaClient {
  export interface IOptions {
    serverSettings?: ServerConnection.ISettings;
    /** Poll `/codellama/status` in the background; off in tests. */
    pollStatus?: boolean;
    now?: () => number;
  }
}
