// Tests when typing counts as opening a blank line that deserves a suggestion.

import { EditorSelection, EditorState, Transaction } from '@codemirror/state';
import { typedOntoBlankLine } from '../blankline';

const DEF = 'def f(x):';

function edit(
  doc: string,
  insert: string,
  at: number,
  userEvent?: string
): { state: EditorState; transactions: Transaction[] } {
  const start = EditorState.create({ doc, selection: EditorSelection.cursor(at) });
  const tr = start.update({
    changes: { from: at, insert },
    selection: EditorSelection.cursor(at + insert.length),
    userEvent
  });
  return { state: tr.state, transactions: [tr] };
}

describe('typedOntoBlankLine', () => {
  it('is true after Enter and its indentation, at the top level too', () => {
    const enter = edit(DEF, '\n    ', DEF.length, 'input');
    expect(typedOntoBlankLine(enter.state, enter.transactions)).toBe(true);
    const topLevel = edit('# load the data', '\n', 15, 'input.type');
    expect(typedOntoBlankLine(topLevel.state, topLevel.transactions)).toBe(true);
  });

  it('is false where the line has text, the edit was not typing, or text is selected', () => {
    const word = edit(DEF + '\n    ', 'return', DEF.length + 5, 'input.type');
    expect(typedOntoBlankLine(word.state, word.transactions)).toBe(false);
    const programmatic = edit(DEF, '\n    ', DEF.length);
    expect(typedOntoBlankLine(programmatic.state, programmatic.transactions)).toBe(false);
    const deleted = edit(DEF, '\n    ', DEF.length, 'delete.backward');
    expect(typedOntoBlankLine(deleted.state, deleted.transactions)).toBe(false);
    const start = EditorState.create({ doc: 'a\n\nb' });
    const selecting = start.update({
      changes: { from: 0, insert: 'x' },
      selection: EditorSelection.range(2, 4),
      userEvent: 'input'
    });
    expect(typedOntoBlankLine(selecting.state, [selecting])).toBe(false);
  });
});
