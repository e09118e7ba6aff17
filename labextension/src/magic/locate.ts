// Finding the notebook cell an answer's output belongs to, over plain shapes so the rules are testable without a DOM.

import { ANSWER_MIME_TYPE } from './answer';

/** Enough of a DOM element to ask whether it holds a node. */
export interface IContainer<N> {
  contains(node: N | null): boolean;
}

export interface ICellEntry<N> {
  readonly node: IContainer<N>;
  /** The MIME bundles of the cell's outputs; read only when the DOM search found nothing. */
  outputData(): Iterable<unknown>;
}

export interface INotebookEntry<N> {
  readonly node: IContainer<N>;
  readonly cells: readonly ICellEntry<N>[];
}

export interface IAnswerOwner<E> {
  notebook: E;
  /** The index of the %%codellama cell whose output holds the answer. */
  index: number;
}

/** The cell whose DOM holds `host`: the rendered answer is inside its output area. */
export function ownerByNode<N, E extends INotebookEntry<N>>(
  host: N,
  notebooks: Iterable<E>
): IAnswerOwner<E> | null {
  for (const notebook of notebooks) {
    if (!notebook.node.contains(host)) {
      continue;
    }
    const index = notebook.cells.findIndex(cell => cell.node.contains(host));
    if (index >= 0) {
      return { notebook, index };
    }
  }
  return null;
}

function carriesRequest(data: unknown, requestId: string): boolean {
  if (typeof data !== 'object' || data === null) {
    return false;
  }
  const answer = (data as Record<string, unknown>)[ANSWER_MIME_TYPE];
  return (
    typeof answer === 'object' &&
    answer !== null &&
    (answer as Record<string, unknown>).request_id === requestId
  );
}

/**
 * The cell whose outputs hold the answer with this request id. This finds the owner of an answer
 * shown outside its notebook's DOM, e.g. in "Create New View for Output", whose output area is a
 * copy in another panel. Notebooks are searched in the order given, so pass the current one first.
 */
export function ownerByRequestId<N, E extends INotebookEntry<N>>(
  requestId: string,
  notebooks: Iterable<E>
): IAnswerOwner<E> | null {
  if (!requestId) {
    return null;
  }
  for (const notebook of notebooks) {
    const index = notebook.cells.findIndex(cell => {
      for (const data of cell.outputData()) {
        if (carriesRequest(data, requestId)) {
          return true;
        }
      }
      return false;
    });
    if (index >= 0) {
      return { notebook, index };
    }
  }
  return null;
}

/** Where the answer rendered at `host` came from: by the DOM when it is inside a notebook, else by its id. */
export function findAnswerOwner<N, E extends INotebookEntry<N>>(
  host: N,
  requestId: string,
  notebooks: readonly E[]
): IAnswerOwner<E> | null {
  return ownerByNode(host, notebooks) ?? ownerByRequestId(requestId, notebooks);
}
