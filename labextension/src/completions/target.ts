// Finds the editor an inline completion is for, and how to describe it to the server, in notebooks, consoles and files.

import type { ICodeCellModel } from '@jupyterlab/cells';
import type { CodeEditor } from '@jupyterlab/codeeditor';
import { ConsolePanel } from '@jupyterlab/console';
import { DocumentWidget } from '@jupyterlab/docregistry';
import { FileEditor } from '@jupyterlab/fileeditor';
import { NotebookPanel } from '@jupyterlab/notebook';
import type { Widget } from '@lumino/widgets';
import type { ICompletionRequest } from '../client/protocol';
import { languageOfMimeType } from './settings';
import { ICellSnapshot, notebookRequest, prefixSuffixRequest } from './request';

export interface ICompletionTarget {
  editor: CodeEditor.IEditor;
  /** The cell type in notebooks; null in files and consoles. */
  cellType: string | null;
  language: string;
  /** Payload for the editor's `text` with the cursor at `jsOffset` (`codePoints` in Python's counting). */
  build(
    text: string,
    jsOffset: number,
    codePoints: number,
    includeOutputs: boolean
  ): ICompletionRequest;
}

export function completionTarget(widget: Widget): ICompletionTarget | null {
  if (widget instanceof NotebookPanel) {
    return notebookTarget(widget);
  }
  if (widget instanceof ConsolePanel) {
    return consoleTarget(widget);
  }
  if (widget instanceof DocumentWidget && widget.content instanceof FileEditor) {
    const editor = widget.content.editor;
    return {
      editor,
      cellType: null,
      language: languageOfMimeType(editor.model.mimeType),
      build: (text, jsOffset) => prefixSuffixRequest(text, jsOffset)
    };
  }
  return null;
}

function notebookTarget(panel: NotebookPanel): ICompletionTarget | null {
  const notebook = panel.content;
  const active = notebook.activeCell;
  const model = notebook.model;
  if (!active || !model || !active.editor) {
    return null;
  }
  const editor = active.editor;
  return {
    editor,
    cellType: active.model.type,
    language: languageOfMimeType(editor.model.mimeType),
    build: (text, _jsOffset, codePoints, includeOutputs) => {
      // Read the in-memory model, not the file: unsaved cells and fresh outputs are the context the user sees.
      const cells: ICellSnapshot[] = [];
      let activeIndex = -1;
      for (let i = 0; i < model.cells.length; i++) {
        const cell = model.cells.get(i);
        const isActive = cell === active.model;
        if (isActive) {
          activeIndex = i;
        }
        cells.push({
          cellType: cell.type,
          source: isActive ? text : cell.sharedModel.getSource(),
          outputs:
            includeOutputs && cell.type === 'code'
              ? (cell as ICodeCellModel).outputs.toJSON()
              : undefined
        });
      }
      return notebookRequest(cells, activeIndex, codePoints, includeOutputs);
    }
  };
}

function consoleTarget(panel: ConsolePanel): ICompletionTarget | null {
  const prompt = panel.console.promptCell;
  if (!prompt || !prompt.editor) {
    return null;
  }
  const editor = prompt.editor;
  return {
    editor,
    cellType: null,
    language: languageOfMimeType(editor.model.mimeType),
    build: (text, jsOffset) => {
      const history: string[] = [];
      const cells = panel.console.cells;
      for (let i = 0; i < cells.length; i++) {
        history.push(cells.get(i).model.sharedModel.getSource());
      }
      return prefixSuffixRequest(text, jsOffset, history);
    }
  };
}
