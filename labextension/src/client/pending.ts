// Routes server messages to the request that asked for them; kept free of sockets so the routing rules are testable alone.

import type { IDoneMessage, ServerMessage } from './protocol';

export interface IStreamHandlers {
  onChunk(delta: string): void;
  onDone(message: IDoneMessage): void;
  onError(message: string): void;
}

export class PendingRequests {
  get size(): number {
    return this._handlers.size;
  }

  has(id: string): boolean {
    return this._handlers.has(id);
  }

  add(id: string, handlers: IStreamHandlers): void {
    if (this._handlers.has(id)) {
      throw new Error(`Request id ${id} is already in flight`);
    }
    this._handlers.set(id, handlers);
  }

  /**
   * Deliver one message. A request ends at its first `done` or `error`; later
   * messages for the same id (a late chunk racing a cancel) are dropped.
   * Returns whether the message belonged to a request in flight.
   */
  dispatch(message: ServerMessage): boolean {
    const handlers = this._handlers.get(message.id);
    if (!handlers) {
      return false;
    }
    switch (message.type) {
      case 'chunk':
        handlers.onChunk(message.text);
        break;
      case 'done':
        this._handlers.delete(message.id);
        handlers.onDone(message);
        break;
      case 'error':
        this._handlers.delete(message.id);
        handlers.onError(message.message);
        break;
    }
    return true;
  }

  /** End every request in flight, e.g. when the socket closes under them. */
  failAll(reason: string): void {
    const handlers = [...this._handlers.values()];
    this._handlers.clear();
    for (const handler of handlers) {
      handler.onError(reason);
    }
  }

  private readonly _handlers = new Map<string, IStreamHandlers>();
}
