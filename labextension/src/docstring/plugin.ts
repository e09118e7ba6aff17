// Plugin for "Generate docstring": the command behind the cell toolbar button, palette and context menu, with busy state and one-step undo.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import type { Cell } from '@jupyterlab/cells';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import type { ReadonlyPartialJSONObject } from '@lumino/coreutils';
import { docstringIcon } from '../icons';
import { CommandIds, ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import {
  DEFAULT_DOCSTRING_SETTINGS,
  IDocstringSettings,
  IEditableSource,
  insertAsOneEdit,
  planDocstrings,
  readDocstringSettings
} from './generate';

const BUSY_CLASS = 'jp-codellama-busy';

/** Used when the server has not said how long its context is. */
const FALLBACK_CONTEXT_TOKENS = 4096;

export const docstringPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:docstring`,
  description: 'Writes docstrings for Python functions and classes with Code Llama.',
  autoStart: true,
  requires: [INotebookTracker, ICodeLlamaClient],
  optional: [ICommandPalette, ISettingRegistry],
  activate: (
    app,
    tracker: INotebookTracker,
    client: ICodeLlamaClient,
    palette: ICommandPalette | null,
    registry: ISettingRegistry | null
  ) => {
    let settings: IDocstringSettings = DEFAULT_DOCSTRING_SETTINGS;
    const busyCells = new Set<string>();
    const id = CommandIds.generateDocstring;
    /**
     * The cell the command is for: the one right-clicked when run from the
     * context menu (right-clicking does not activate a cell), else the active one.
     */
    const codeCellFor = (args: ReadonlyPartialJSONObject): Cell | null => {
      let cell: Cell | null = tracker.activeCell;
      if (args.origin === 'context-menu') {
        const node = app.contextMenuHitTest(n => n.classList.contains('jp-Cell'));
        cell = tracker.currentWidget?.content.widgets.find(w => w.node === node) ?? null;
      }
      return cell && cell.model.type === 'code' ? cell : null;
    };
    const isBusy = (cell: Cell | null) => !!cell && busyCells.has(cell.model.id);
    /**
     * A read-only notebook or a cell marked not editable is the user saying "do not change this".
     * `notebook`: the cell's own, which stays the one to ask after the user switched tabs.
     */
    const isEditable = (cell: Cell, notebook = tracker.currentWidget?.content) =>
      !cell.readOnly && !(notebook?.model?.readOnly ?? false);
    const refresh = () => app.commands.notifyCommandChanged(id);

    const generate = async (cell: Cell) => {
      const notebook = tracker.currentWidget?.content;
      const editor = cell.editor;
      if (!notebook?.model || !editor) {
        return;
      }
      const source = cell.model.sharedModel.getSource();
      const cursor = editor.getOffsetAt(editor.getCursorPosition());
      const codeAbove: string[] = [];
      const notebookCode: string[] = [];
      let above = true;
      for (let i = 0; i < notebook.model.cells.length; i++) {
        const model = notebook.model.cells.get(i);
        if (model === cell.model) {
          above = false;
        }
        if (model.type === 'code') {
          const text = model.sharedModel.getSource();
          notebookCode.push(text);
          if (above) {
            codeAbove.push(text);
          }
        }
      }
      const status =
        client.status?.state === 'ready' ? client.status : await client.refreshStatus();
      if (status.state !== 'ready') {
        throw new Error(status.error ?? 'The model is still loading; try again in a moment.');
      }
      const plan = await planDocstrings({
        source,
        cursor,
        codeAbove,
        notebookCode,
        infilling: status.model?.supports_infilling ?? false,
        maxContextTokens: status.model?.max_context || FALLBACK_CONTEXT_TOKENS,
        settings,
        complete: request => client.complete(request)
      });
      if (plan.kind === 'nothing') {
        Notification.info(plan.reason, { autoClose: 4000 });
        return;
      }
      if (!isEditable(cell, notebook)) {
        throw new Error('The cell became read-only while the docstring was being written.');
      }
      if (cell.model.sharedModel.getSource() !== source) {
        // Offsets were computed for the old text; inserting now could split a line the user just wrote.
        throw new Error(
          'The cell changed while the docstring was being written; nothing was inserted.'
        );
      }
      // The cell's shared model carries the undo manager at runtime; its public type does not declare it.
      insertAsOneEdit(cell.model.sharedModel as unknown as IEditableSource, plan.insertions);
      // The busy (disabled) button dropped the focus it took from the editor; give it back so Ctrl+Z undoes at once.
      const focused = document.activeElement;
      if (
        tracker.activeCell === cell &&
        (!focused || focused === document.body || notebook.node.contains(focused))
      ) {
        notebook.mode = 'edit';
        editor.focus();
      }
    };

    app.commands.addCommand(id, {
      label: args => (isBusy(codeCellFor(args)) ? 'Generating docstring…' : 'Generate docstring'),
      caption:
        'Ask Code Llama to write the docstring of the function or class at the cursor (or of every undocumented one in the cell)',
      icon: docstringIcon,
      className: args => (isBusy(codeCellFor(args)) ? BUSY_CLASS : ''),
      isVisible: args => codeCellFor(args) !== null,
      isEnabled: args => {
        const cell = codeCellFor(args);
        return cell !== null && !isBusy(cell) && isEditable(cell);
      },
      execute: async args => {
        const cell = codeCellFor(args);
        if (!cell || busyCells.has(cell.model.id)) {
          return;
        }
        if (!isEditable(cell)) {
          Notification.warning('This cell is read-only.', { autoClose: 5000 });
          return;
        }
        busyCells.add(cell.model.id);
        refresh();
        try {
          await generate(cell);
        } catch (reason) {
          const message = reason instanceof Error ? reason.message : String(reason);
          Notification.error(`Docstring generation failed: ${message}`, { autoClose: 8000 });
        } finally {
          busyCells.delete(cell.model.id);
          refresh();
        }
      }
    });
    tracker.activeCellChanged.connect(refresh);
    palette?.addItem({ command: id, category: 'Code Llama' });

    registry
      ?.load(docstringPlugin.id)
      .then(loaded => {
        const apply = () => {
          settings = readDocstringSettings(loaded.composite);
        };
        apply();
        loaded.changed.connect(apply);
      })
      .catch(reason => {
        console.warn('Code Llama: docstring settings unavailable, using defaults', reason);
      });
  }
};
