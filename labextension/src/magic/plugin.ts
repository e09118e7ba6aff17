// Plugin that renders %%codellama answers in JupyterLab and wires their buttons to the notebook and the server.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Clipboard, Notification } from '@jupyterlab/apputils';
import type { ICodeCellModel } from '@jupyterlab/cells';
import { IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import { INotebookModel, INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import type { IAnswer } from './answer';
import { insertCodeBelow, replaceCellSource } from './edit';
import { IAnswerOwner, ICellEntry, INotebookEntry, findAnswerOwner } from './locate';
import { answerRendererFactory } from './renderer';

/**
 * Lower ranks win. Markdown is 60 and HTML 50, the magic's fallbacks for other frontends; widget
 * views sit at 0, and nothing else claims this MIME type.
 */
export const ANSWER_RENDERER_RANK = 20;

interface IPanelEntry extends INotebookEntry<Node> {
  readonly panel: NotebookPanel;
}

function outputData(panel: NotebookPanel, index: number): Iterable<unknown> {
  const model = panel.content.model?.cells.get(index);
  if (!model || model.type !== 'code') {
    return [];
  }
  const outputs = (model as ICodeCellModel).outputs;
  const data: unknown[] = [];
  for (let i = 0; i < outputs.length; i++) {
    data.push(outputs.get(i).data);
  }
  return data;
}

/** Every open notebook as plain entries for `findAnswerOwner`, the current one first. */
function notebookEntries(tracker: INotebookTracker): IPanelEntry[] {
  const panels: NotebookPanel[] = [];
  tracker.forEach(panel => {
    if (panel.content.model) {
      panels.push(panel);
    }
  });
  const current = tracker.currentWidget;
  panels.sort((a, b) => Number(b === current) - Number(a === current));
  return panels.map(panel => ({
    panel,
    node: panel.content.node,
    cells: panel.content.widgets.map((cell, index): ICellEntry<Node> => ({
      node: cell.node,
      outputData: () => outputData(panel, index)
    }))
  }));
}

export const magicPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:magic`,
  description: 'Shows %%codellama answers with Insert below, Replace this cell, Copy and Stop.',
  autoStart: true,
  requires: [IRenderMimeRegistry, INotebookTracker, ICodeLlamaClient],
  optional: [IEditorLanguageRegistry],
  activate: (
    _app,
    rendermime: IRenderMimeRegistry,
    tracker: INotebookTracker,
    client: ICodeLlamaClient,
    languages: IEditorLanguageRegistry | null
  ) => {
    const owner = (host: HTMLElement, answer: IAnswer): IAnswerOwner<IPanelEntry> | null => {
      const found = findAnswerOwner(host, answer.requestId, notebookEntries(tracker));
      if (!found) {
        Notification.warning(
          'This answer is not in an open notebook; use Copy to take the code elsewhere.',
          { autoClose: 5000 }
        );
      }
      return found;
    };

    const edit = (
      host: HTMLElement,
      answer: IAnswer,
      change: (panel: NotebookPanel, model: INotebookModel, index: number) => void
    ) => {
      const found = owner(host, answer);
      if (!found) {
        return;
      }
      const { panel } = found.notebook;
      const model = panel.content.model;
      if (!model) {
        return;
      }
      if (model.readOnly) {
        Notification.warning('This notebook is read-only.', { autoClose: 5000 });
        return;
      }
      try {
        change(panel, model, found.index);
      } catch (reason) {
        const message = reason instanceof Error ? reason.message : String(reason);
        Notification.error(`Code Llama could not edit the notebook: ${message}`, {
          autoClose: 8000
        });
      }
    };

    /** Select cell `index` in command mode, where Z (a cell inserted) or Ctrl+Z (its text replaced) undoes the edit at once. */
    const selectCell = (panel: NotebookPanel, index: number) => {
      const notebook = panel.content;
      notebook.mode = 'command';
      notebook.activeCellIndex = index;
      notebook.deselectAll();
      // Not scrollToCell: it activates the cell, which focuses its editor and so enters edit mode.
      void notebook.scrollToItem(index, 'smart').catch(() => undefined);
      notebook.activate();
    };

    const actions = {
      insertBelow: (host: HTMLElement, answer: IAnswer) =>
        edit(host, answer, (panel, model, index) => {
          const inserted = insertCodeBelow(model.sharedModel, index, answer.code);
          selectCell(panel, inserted);
        }),
      replaceCell: (host: HTMLElement, answer: IAnswer) =>
        edit(host, answer, (panel, model, index) => {
          replaceCellSource(model.sharedModel, index, answer.code);
          selectCell(panel, index);
        }),
      copy: async (answer: IAnswer) => {
        // JupyterLab's copy works without the async Clipboard API's permission prompt.
        Clipboard.copyToSystem(answer.code);
      },
      stop: (answer: IAnswer) => {
        // The request runs on the kernel's own connection; the server routes a cancel by id from any client.
        client.cancel(answer.requestId);
      },
      highlight: async (code: string, into: HTMLElement) => {
        const python = languages?.findBest('python') ?? null;
        if (!languages || !python) {
          into.textContent = code;
          return;
        }
        into.classList.add('cm-s-jupyter', 'language-python');
        await languages.highlight(code, python, into);
      }
    };

    rendermime.addFactory(
      answerRendererFactory(actions, ANSWER_RENDERER_RANK),
      ANSWER_RENDERER_RANK
    );
  }
};
