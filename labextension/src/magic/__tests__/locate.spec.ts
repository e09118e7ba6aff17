// Tests finding the %%codellama cell an answer belongs to: by the DOM first, by request id for views outside the notebook.

import { ANSWER_MIME_TYPE } from '../answer';
import {
  ICellEntry,
  INotebookEntry,
  findAnswerOwner,
  ownerByNode,
  ownerByRequestId
} from '../locate';

/** A DOM stand-in: a node with a parent chain, so `contains` means what it means in a document. */
class FakeNode {
  constructor(
    readonly name: string,
    readonly parent: FakeNode | null = null
  ) {}

  child(name: string): FakeNode {
    return new FakeNode(name, this);
  }

  contains(other: FakeNode | null): boolean {
    for (let node = other; node; node = node.parent) {
      if (node === this) {
        return true;
      }
    }
    return false;
  }
}

function answerOutput(requestId: string): unknown {
  return { [ANSWER_MIME_TYPE]: { code: 'x', request_id: requestId }, 'text/plain': 'x' };
}

interface ITestNotebook extends INotebookEntry<FakeNode> {
  name: string;
  cellNodes: FakeNode[];
  reads: number;
}

function notebook(name: string, outputs: unknown[][], root = new FakeNode('body')): ITestNotebook {
  const node = root.child(name);
  const cellNodes = outputs.map((_, i) => node.child(`${name}-cell-${i}`));
  const entry: ITestNotebook = {
    name,
    node,
    cellNodes,
    reads: 0,
    cells: outputs.map((data, i): ICellEntry<FakeNode> => ({
      node: cellNodes[i],
      outputData: () => {
        entry.reads += 1;
        return data;
      }
    }))
  };
  return entry;
}

describe('ownerByNode', () => {
  it('finds the cell whose output area holds the rendered answer', () => {
    const first = notebook('first', [[], []]);
    const second = notebook('second', [[], [], []]);
    const host = second.cellNodes[2].child('output-area').child('output').child('renderer');
    expect(ownerByNode(host, [first, second])).toEqual({ notebook: second, index: 2 });
    expect(first.reads + second.reads).toBe(0);
  });

  it('finds nothing for a node outside every notebook', () => {
    const root = new FakeNode('body');
    const nb = notebook('nb', [[]], root);
    expect(ownerByNode(root.child('output-view').child('renderer'), [nb])).toBeNull();
  });

  it('finds nothing for a node in a notebook but in no cell', () => {
    const nb = notebook('nb', [[]]);
    expect(ownerByNode((nb.node as FakeNode).child('footer'), [nb])).toBeNull();
  });
});

describe('ownerByRequestId', () => {
  it('finds the cell with the answer among its outputs', () => {
    const nb = notebook('nb', [
      [{ 'text/plain': 'hello' }],
      [answerOutput('magic-other')],
      [{ 'text/plain': 'log' }, answerOutput('magic-wanted')]
    ]);
    expect(ownerByRequestId('magic-wanted', [nb])).toEqual({ notebook: nb, index: 2 });
  });

  it('searches the notebooks in the order given', () => {
    const current = notebook('current', [[], [answerOutput('magic-1')]]);
    const other = notebook('other', [[answerOutput('magic-1')]]);
    expect(ownerByRequestId('magic-1', [current, other])?.notebook).toBe(current);
    expect(ownerByRequestId('magic-1', [other, current])?.notebook).toBe(other);
  });

  it('ignores outputs that only look similar, and an empty id', () => {
    const nb = notebook('nb', [
      [
        null,
        'text',
        { [ANSWER_MIME_TYPE]: 'magic-1' },
        { 'text/plain': { request_id: 'magic-1' } }
      ],
      [answerOutput('')]
    ]);
    expect(ownerByRequestId('magic-1', [nb])).toBeNull();
    expect(ownerByRequestId('', [nb])).toBeNull();
  });
});

describe('findAnswerOwner', () => {
  it('prefers the DOM: the same answer may be in two notebooks (a copied cell)', () => {
    const first = notebook('first', [[answerOutput('magic-1')]]);
    const second = notebook('second', [[], [answerOutput('magic-1')]]);
    const host = second.cellNodes[1].child('renderer');
    expect(findAnswerOwner(host, 'magic-1', [first, second])).toEqual({
      notebook: second,
      index: 1
    });
    expect(first.reads + second.reads).toBe(0);
  });

  it('falls back to the request id for an output shown in a view of its own', () => {
    const root = new FakeNode('body');
    const nb = notebook('nb', [[], [answerOutput('magic-1')]], root);
    const host = root.child('output-view').child('renderer');
    expect(findAnswerOwner(host, 'magic-1', [nb])).toEqual({ notebook: nb, index: 1 });
    expect(findAnswerOwner(host, 'magic-2', [nb])).toBeNull();
  });
});
