// One completion request and its candidates as they stream in, reconciled with what the user types meanwhile.

import type { ICompletionRequest } from '../client/protocol';
import type { ICodeLlamaClient, ICompletionStream } from '../tokens';
import { ISnapshot, reconcile, Reconciliation } from './reconcile';

export interface ISuggestionOptions {
  client: Pick<ICodeLlamaClient, 'stream'>;
  request: ICompletionRequest;
  snapshot: ISnapshot;
  /** The editor's text now; read on demand so typing needs no bookkeeping here. */
  readText: () => string;
  candidates: number;
}

export class LiveSuggestion {
  constructor(options: ISuggestionOptions) {
    this._snapshot = options.snapshot;
    this._readText = options.readText;
    this._texts = new Array<string>(Math.max(1, options.candidates)).fill('');
    // The server streams the first candidate; the others arrive whole with `done`.
    this._stream = options.client.stream(options.request, (_delta, soFar) => {
      this._texts[0] = soFar;
      // Text typed ahead of generation is only judged once the model's text reaches it.
      this._cancelIfDiverged();
      this._notify();
    });
    this._stream.done.then(
      message => {
        this._texts = this._texts.map((_, i) =>
          i === 0 ? message.text : (message.choices[i] ?? '')
        );
        this._cancelled = message.cancelled === true;
        this._finish();
      },
      (reason: unknown) => {
        this._error = reason instanceof Error ? reason.message : String(reason);
        this._finish();
      }
    );
  }

  get id(): string {
    return this._stream.id;
  }

  get candidates(): number {
    return this._texts.length;
  }

  get finished(): boolean {
    return this._finished;
  }

  get cancelled(): boolean {
    return this._cancelled;
  }

  get error(): string | null {
    return this._error;
  }

  /** Resolves once the first candidate has text to show, or nothing more will come. */
  async ready(): Promise<void> {
    while (!this._finished && this._texts[0] === '') {
      await this._nextChange();
    }
  }

  /** Resolves once generation has ended: every candidate is whole. */
  async settled(): Promise<void> {
    while (!this._finished) {
      await this._nextChange();
    }
  }

  view(index: number): Reconciliation {
    return reconcile(this._snapshot, this._readText(), this._texts[index] ?? '');
  }

  /** What the ghost text for candidate `index` should show now, or null if the user left it behind. */
  remaining(index: number): string | null {
    const view = this.view(index);
    return view.kind === 'consistent' ? view.remaining : null;
  }

  /**
   * Whether the user is still following this suggestion: something is left to
   * show, or more is being generated that may match what they typed ahead.
   */
  isFollowed(): boolean {
    if (this._cancelRequested) {
      return false; // nothing more will come to show
    }
    const view = this.view(0);
    if (view.kind === 'consistent') {
      return view.remaining !== '' || !this._finished;
    }
    return view.kind === 'ahead' && !this._finished;
  }

  /** Called on every edit of the editor: a suggestion typed past is stopped on the server. */
  noteEditorChange(): void {
    this._cancelIfDiverged();
    this._notify();
  }

  cancel(): void {
    if (!this._finished && !this._cancelRequested) {
      this._cancelRequested = true;
      this._stream.cancel();
    }
  }

  /** Successive ghost texts for candidate `index`, until generation ends or the user types past it. */
  async *updates(index: number): AsyncGenerator<string> {
    let shown: string | null = null;
    for (;;) {
      const finished = this._finished;
      const view = this.view(index);
      if (view.kind === 'diverged') {
        return;
      }
      if (view.kind === 'consistent' && view.remaining !== shown) {
        shown = view.remaining;
        yield shown;
      }
      if (finished) {
        return;
      }
      await this._nextChange();
    }
  }

  private _cancelIfDiverged(): void {
    if (!this._finished && this.view(0).kind === 'diverged') {
      this.cancel();
    }
  }

  private _finish(): void {
    this._finished = true;
    this._notify();
  }

  private _nextChange(): Promise<void> {
    return new Promise(resolve => this._waiters.push(resolve));
  }

  private _notify(): void {
    const waiters = this._waiters;
    this._waiters = [];
    for (const wake of waiters) {
      wake();
    }
  }

  private readonly _snapshot: ISnapshot;
  private readonly _readText: () => string;
  private readonly _stream: ICompletionStream;
  private _texts: string[];
  private _waiters: Array<() => void> = [];
  private _finished = false;
  private _cancelled = false;
  private _cancelRequested = false;
  private _error: string | null = null;
}
