// Tests that Insert below and Replace this cell each make exactly one undo step, in the history JupyterLab undoes them from.

import { IEditableCell, IEditableNotebook, insertCodeBelow, replaceCellSource } from '../edit';

/**
 * An undo history kept the way Yjs's undo manager keeps it: changes in one transaction form one
 * step, and so do transactions less than the capture timeout apart, unless stopCapturing() closed
 * the step in between. Nested transactions join the outer one, as in Yjs.
 */
class History {
  steps: string[][] = [];
  private _depth = 0;
  private _capturing = false;

  undoManager = {
    stopCapturing: () => {
      this._capturing = false;
    }
  };

  transact(f: () => void): void {
    if (this._depth === 0 && !this._capturing) {
      this.steps.push([]);
    }
    this._depth += 1;
    try {
      f();
    } finally {
      this._depth -= 1;
      if (this._depth === 0) {
        this._capturing = true;
      }
    }
  }

  record(change: string): void {
    this.transact(() => this.steps[this.steps.length - 1].push(change));
  }
}

class FakeCell implements IEditableCell {
  readonly history = new History();
  readonly undoManager = this.history.undoManager;
  readonly cell_type = 'code';

  constructor(public source: string) {}

  transact(f: () => void): void {
    this.history.transact(f);
  }

  getSource(): string {
    return this.source;
  }

  setSource(value: string): void {
    // YCell.setSource deletes and inserts in a transaction of its own.
    this.history.transact(() => {
      this.history.record('delete');
      this.history.record('insert');
      this.source = value;
    });
  }

  /** A user's typing, possibly just before or after the click. */
  type(text: string): void {
    this.history.record('type');
    this.source += text;
  }
}

class FakeNotebook implements IEditableNotebook {
  readonly history = new History();
  readonly undoManager = this.history.undoManager;
  cells: FakeCell[];

  constructor(sources: string[]) {
    this.cells = sources.map(source => new FakeCell(source));
  }

  transact(f: () => void): void {
    this.history.transact(f);
  }

  insertCell(index: number, cell: { cell_type: 'code'; source: string }): unknown {
    this.history.record(`insert cell ${index}`);
    this.cells.splice(index, 0, new FakeCell(cell.source));
    return this.cells[index];
  }

  getCell(index: number): FakeCell {
    return this.cells[index];
  }

  /** A cell operation of the user's, e.g. Shift+Enter on the last cell adding one below. */
  addCellAtEnd(): void {
    this.history.record(`insert cell ${this.cells.length}`);
    this.cells.push(new FakeCell(''));
  }
}

describe('insertCodeBelow', () => {
  it("adds one code cell after the given one, as one step of the notebook's own", () => {
    const notebook = new FakeNotebook(['%%codellama\nplot it', 'print(1)']);
    notebook.addCellAtEnd();
    expect(insertCodeBelow(notebook, 0, 'plt.plot(x)')).toBe(1);
    notebook.addCellAtEnd();
    expect(notebook.cells.map(c => c.source)).toEqual([
      '%%codellama\nplot it',
      'plt.plot(x)',
      'print(1)',
      '',
      ''
    ]);
    expect(notebook.history.steps).toEqual([
      ['insert cell 2'],
      ['insert cell 1'],
      ['insert cell 4']
    ]);
    // The new cell's text is part of the insert: undoing its text finds nothing of the answer.
    expect(notebook.cells[1].history.steps).toEqual([]);
  });

  it('inserts after the last cell too, and refuses a cell that is not there', () => {
    const notebook = new FakeNotebook(['a']);
    expect(insertCodeBelow(notebook, 0, 'b')).toBe(1);
    expect(notebook.cells.map(c => c.source)).toEqual(['a', 'b']);
    expect(() => insertCodeBelow(notebook, 2, 'c')).toThrow(RangeError);
    expect(() => insertCodeBelow(notebook, -1, 'c')).toThrow(RangeError);
    expect(notebook.cells).toHaveLength(2);
  });
});

describe('replaceCellSource', () => {
  it("replaces the text as one step of the cell's history, apart from typing before and after", () => {
    const notebook = new FakeNotebook(['x = 1', '%%codellama\ndef f(): <FILL>']);
    const cell = notebook.cells[1];
    cell.type(' ');
    expect(replaceCellSource(notebook, 1, 'def f():\n    return 1')).toBe(true);
    cell.type('\n');
    expect(cell.source).toBe('def f():\n    return 1\n');
    expect(cell.history.steps).toEqual([['type'], ['delete', 'insert'], ['type']]);
    expect(notebook.history.steps).toEqual([]);
    expect(notebook.cells[0].history.steps).toEqual([]);
  });

  it('changes nothing when the cell already holds the code', () => {
    const notebook = new FakeNotebook(['same']);
    expect(replaceCellSource(notebook, 0, 'same')).toBe(false);
    expect(notebook.cells[0].history.steps).toEqual([]);
    expect(() => replaceCellSource(notebook, 1, 'x')).toThrow(RangeError);
  });
});
