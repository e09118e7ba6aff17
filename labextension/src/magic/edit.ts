// Putting an answer into the notebook as one undoable step: insert a code cell below, or replace a cell's source.
//
// JupyterLab 4 keeps two histories: the notebook's, of cell operations (inserting, deleting, moving
// cells; undone with Z in command mode), and each cell's, of its text (undone with Ctrl+Z, in edit
// mode or in command mode on the active cell). Each edit goes into the history where JupyterLab's own
// edit of that kind goes, so the user's usual key takes it back.

/** What both shared models (`@jupyter/ydoc`'s YNotebook and YCell) offer for grouping changes. */
interface ITransacting {
  transact(f: () => void, undoable?: boolean): void;
}

export interface IEditableCell extends ITransacting {
  getSource(): string;
  setSource(value: string): void;
}

/** The parts of the notebook's shared model these edits use. */
export interface IEditableNotebook extends ITransacting {
  readonly cells: readonly { readonly cell_type: string }[];
  insertCell(index: number, cell: { cell_type: 'code'; source: string }): unknown;
  getCell(index: number): IEditableCell;
}

/** The undo manager the shared models have at runtime and their public interfaces do not declare. */
interface IUndoCapture {
  undoManager?: { stopCapturing?(): void } | null;
}

/**
 * Close the undo manager's current step. Yjs merges changes less than half a second apart into one
 * step, so without this one undo could also take back an edit made just before the click, or
 * typing right after it could be undone together with the answer.
 */
function closeUndoStep(model: ITransacting): void {
  (model as unknown as IUndoCapture).undoManager?.stopCapturing?.();
}

/** Apply `change` in one undoable transaction of `model`: exactly one step of its history. */
function asOneStep(model: ITransacting, change: () => void): void {
  closeUndoStep(model);
  model.transact(change);
  closeUndoStep(model);
}

/**
 * Insert `code` as a new code cell after cell `index`, as one cell operation (undone with Z in
 * command mode, like any inserted cell); returns the new cell's index.
 */
export function insertCodeBelow(notebook: IEditableNotebook, index: number, code: string): number {
  if (index < 0 || index >= notebook.cells.length) {
    throw new RangeError(`No cell ${index} to insert below`);
  }
  asOneStep(notebook, () => {
    notebook.insertCell(index + 1, { cell_type: 'code', source: code });
  });
  return index + 1;
}

/**
 * Replace the source of cell `index` with `code`, as one edit of that cell's text (undone with
 * Ctrl+Z on the cell); returns false when it already reads so.
 */
export function replaceCellSource(
  notebook: IEditableNotebook,
  index: number,
  code: string
): boolean {
  if (index < 0 || index >= notebook.cells.length) {
    throw new RangeError(`No cell ${index} to replace`);
  }
  const cell = notebook.getCell(index);
  if (cell.getSource() === code) {
    return false;
  }
  asOneStep(cell, () => cell.setSource(code));
  return true;
}
