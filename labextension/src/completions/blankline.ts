// Asks for a suggestion when typing leaves the cursor on a blank line, where JupyterLab's inline completer never asks by itself.

import type { EditorState, Extension, Transaction } from '@codemirror/state';
import { EditorView } from '@codemirror/view';

/**
 * Whether the user's typing (Enter and the indentation it brings included) left the cursor alone on
 * a blank line: a new line in a function body is where a whole block is most wanted, yet JupyterLab
 * only asks its inline providers at the end of a line that has text.
 */
export function typedOntoBlankLine(
  state: EditorState,
  transactions: readonly Transaction[]
): boolean {
  if (!transactions.some(tr => tr.docChanged && tr.isUserEvent('input'))) {
    return false;
  }
  const selection = state.selection.main;
  return selection.empty && state.doc.lineAt(selection.head).text.trim() === '';
}

/** An editor extension calling `onBlankLine` with the focused editor after such an edit. */
export function blankLineTrigger(onBlankLine: (view: EditorView) => void): Extension {
  return EditorView.updateListener.of(update => {
    if (
      update.docChanged &&
      update.view.hasFocus &&
      typedOntoBlankLine(update.state, update.transactions)
    ) {
      onBlankLine(update.view);
    }
  });
}
