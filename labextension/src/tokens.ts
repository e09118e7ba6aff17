// Tokens and interfaces the Code Llama plugins share, so features depend on the client's contract and not on its class.

import { Token } from '@lumino/coreutils';
import type { ISignal } from '@lumino/signaling';
import type {
  ICompletionRequest,
  ICompletionResult,
  IDoneMessage,
  IServerStatus
} from './client/protocol';

/** Every plugin id of this extension starts with this. */
export const PLUGIN_PREFIX = 'jupyter-codellama';

/** Command ids; `codellama:` is the prefix users see in shortcuts and the palette. */
export namespace CommandIds {
  export const generateDocstring = 'codellama:generate-docstring';
  export const acceptNextWord = 'codellama:accept-next-word';
  export const acceptNextLine = 'codellama:accept-next-line';
  export const openSettings = 'codellama:open-settings';
}

/** One streamed completion in flight on the shared websocket. */
export interface ICompletionStream {
  readonly id: string;
  /** Resolves with the final message, also when cancelled; rejects with the server's error. */
  readonly done: Promise<IDoneMessage>;
  /** Ask the server to stop generating; `done` then resolves with `cancelled: true`. */
  cancel(): void;
}

export interface ICodeLlamaClient {
  /** Last status the server reported, or null before the first answer. */
  readonly status: IServerStatus | null;
  readonly statusChanged: ISignal<ICodeLlamaClient, IServerStatus | null>;
  /** Requests in flight (streamed and REST), for the status bar's busy state. */
  readonly activeRequests: number;
  readonly activityChanged: ISignal<ICodeLlamaClient, number>;
  /**
   * Why the last streamed request failed, or null when it did not: typing-time failures show no
   * error on the ghost text, so the status bar says it (a notebook over the server's limits, say).
   * Set before `activityChanged` reports the request's end.
   */
  readonly lastFailure: string | null;
  refreshStatus(): Promise<IServerStatus>;
  /** Stream a completion over the tab's websocket; `onChunk` gets each delta and the text so far. */
  stream(
    request: ICompletionRequest,
    onChunk?: (delta: string, textSoFar: string) => void
  ): ICompletionStream;
  /** One-shot completion over REST, for callers that want the whole answer at once. */
  complete(request: ICompletionRequest): Promise<ICompletionResult>;
  /**
   * Ask the server to stop request `id`, whichever connection started it (a kernel's %%codellama
   * answer runs on the kernel's own socket). Opens this tab's websocket if need be; fire and forget.
   */
  cancel(id: string): void;
}

export const ICodeLlamaClient = new Token<ICodeLlamaClient>(
  `${PLUGIN_PREFIX}:ICodeLlamaClient`,
  'The Code Llama server client: one websocket per browser tab, status and REST completions.'
);
