// The MIME renderer for a %%codellama answer: highlighted code, progress, and Insert below / Replace / Copy / Stop.

import type { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';
import { ANSWER_MIME_TYPE, IAnswer, describeAnswer, parseAnswer } from './answer';

/** What the buttons do; the plugin supplies them, so the view knows nothing of notebooks or sockets. */
export interface IAnswerActions {
  /** `host` is the rendered answer's node, from which the owning cell is found. */
  insertBelow(host: HTMLElement, answer: IAnswer): void;
  replaceCell(host: HTMLElement, answer: IAnswer): void;
  copy(answer: IAnswer): Promise<void>;
  stop(answer: IAnswer): void;
  /** Write highlighted `code` into `into`; may finish after a newer call, whose result then wins. */
  highlight(code: string, into: HTMLElement): Promise<void>;
}

const CLASS = 'jp-codellama-Answer';
const COPIED_FEEDBACK_MS = 1500;

function button(label: string, action: string, title: string): HTMLButtonElement {
  const element = document.createElement('button');
  element.type = 'button';
  element.className = `jp-Button ${CLASS}-button`;
  element.textContent = label;
  element.title = title;
  element.dataset.title = title;
  element.dataset.action = action;
  return element;
}

export class AnswerRenderer extends Widget implements IRenderMime.IRenderer {
  constructor(actions: IAnswerActions) {
    super();
    this._actions = actions;
    this.addClass(CLASS);
    this.node.dataset.mimeType = ANSWER_MIME_TYPE;

    const toolbar = document.createElement('div');
    toolbar.className = `${CLASS}-toolbar`;
    this._insert = button('Insert below', 'insert', 'Put the code into a new cell below (not run)');
    this._replace = button(
      'Replace this cell',
      'replace',
      'Replace the %%codellama cell with the code (not run)'
    );
    this._copy = button('Copy', 'copy', 'Copy the code to the clipboard');
    this._stop = button('Stop', 'stop', 'Stop writing this answer');
    this._stop.classList.add(`${CLASS}-stop`);
    toolbar.append(this._insert, this._replace, this._copy, this._stop);

    this._code = document.createElement('pre');
    this._code.className = `${CLASS}-code`;
    this._status = document.createElement('div');
    this._status.className = `${CLASS}-status`;
    this._error = document.createElement('div');
    this._error.className = `${CLASS}-error`;
    this.node.append(this._code, this._error, this._status, toolbar);

    this._insert.addEventListener('click', () => this._act(a => actions.insertBelow(this.node, a)));
    this._replace.addEventListener('click', () =>
      this._act(a => actions.replaceCell(this.node, a))
    );
    this._copy.addEventListener('click', () => {
      const answer = this._answer;
      if (answer && describeAnswer(answer, this._stopRequested).canCopy) {
        void this._copyCode(answer);
      }
    });
    this._stop.addEventListener('click', () => {
      if (this._answer && !this._answer.done) {
        this._stopRequested = true;
        this._show();
        actions.stop(this._answer);
      }
    });
  }

  /** Called for the first display and again for every update of it while the answer streams. */
  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const answer = parseAnswer(model.data[ANSWER_MIME_TYPE]);
    this._answer = answer;
    this._show();
    if (!answer) {
      return;
    }
    if (answer.code !== this._shownCode) {
      this._shownCode = answer.code;
      await this._highlight(answer.code);
    }
  }

  private _show(): void {
    const answer = this._answer;
    if (!answer) {
      this.node.dataset.state = 'error';
      this._error.textContent = 'This Code Llama answer cannot be read (malformed output data).';
      this._error.hidden = false;
      this._status.textContent = '';
      for (const element of [this._insert, this._replace, this._copy]) {
        element.disabled = true;
      }
      this._stop.hidden = true;
      return;
    }
    const view = describeAnswer(answer, this._stopRequested);
    this.node.dataset.state = view.state;
    this.node.dataset.kind = answer.kind;
    this._status.textContent = view.status;
    this._error.textContent = view.error ?? '';
    this._error.hidden = view.error === null;
    for (const element of [this._insert, this._replace]) {
      element.disabled = !view.canEdit;
      element.title = view.canEdit ? (element.dataset.title ?? '') : view.editBlocked;
    }
    this._copy.disabled = !view.canCopy;
    this._stop.hidden = !view.showStop;
    this._stop.disabled = !view.canStop;
  }

  private async _highlight(code: string): Promise<void> {
    const turn = ++this._highlights;
    const target = document.createElement('code');
    try {
      await this._actions.highlight(code, target);
    } catch {
      // Highlighting is decoration: plain text is still the answer.
      target.textContent = code;
    }
    // Updates arrive every 0.1 s; a slow, older highlight must not overwrite a newer one.
    if (turn === this._highlights && !this.isDisposed) {
      this._code.replaceChildren(target);
    }
  }

  private _act(action: (answer: IAnswer) => void | Promise<void>): void {
    const answer = this._answer;
    if (!answer || !describeAnswer(answer, this._stopRequested).canEdit) {
      return;
    }
    void action(answer);
  }

  private async _copyCode(answer: IAnswer): Promise<void> {
    try {
      await this._actions.copy(answer);
      this._copy.textContent = 'Copied';
    } catch {
      this._copy.textContent = 'Copy failed';
    }
    window.setTimeout(() => {
      if (!this.isDisposed) {
        this._copy.textContent = 'Copy';
      }
    }, COPIED_FEEDBACK_MS);
  }

  private readonly _actions: IAnswerActions;
  private readonly _insert: HTMLButtonElement;
  private readonly _replace: HTMLButtonElement;
  private readonly _copy: HTMLButtonElement;
  private readonly _stop: HTMLButtonElement;
  private readonly _code: HTMLPreElement;
  private readonly _status: HTMLDivElement;
  private readonly _error: HTMLDivElement;
  private _answer: IAnswer | null = null;
  private _shownCode: string | null = null;
  private _highlights = 0;
  private _stopRequested = false;
}

/** The factory JupyterLab asks for a renderer whenever an output carries the answer's MIME type. */
export function answerRendererFactory(
  actions: IAnswerActions,
  rank: number
): IRenderMime.IRendererFactory {
  return {
    // Nothing in the answer is run or parsed as HTML, so untrusted notebooks may show it too.
    safe: true,
    mimeTypes: [ANSWER_MIME_TYPE],
    defaultRank: rank,
    createRenderer: () => new AnswerRenderer(actions)
  };
}
