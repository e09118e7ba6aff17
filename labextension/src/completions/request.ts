// Turns what the editor shows (the live notebook, or a file or console's text) into a completion request payload.

import type {
  INotebookCellPayload,
  INotebookRequest,
  IOutputPayload,
  IPrefixSuffixRequest
} from '../client/protocol';
import { headOf } from '../codepoints';

/** Outputs are context, not content: a long dataframe print helps no more than its head. */
export const MAX_OUTPUT_CHARS = 2000;

/** Console history older than this rarely matters and makes every request heavier. */
export const MAX_CONSOLE_HISTORY_CELLS = 20;

export interface ICellSnapshot {
  cellType: string;
  source: string;
  /** nbformat output dicts as the in-memory model serialises them. */
  outputs?: readonly unknown[];
}

type MultilineText = string | string[];

function joinText(text: unknown): string {
  if (typeof text === 'string') {
    return text;
  }
  if (Array.isArray(text)) {
    return (text as MultilineText[]).join('');
  }
  return '';
}

/**
 * A few more than the server reads (it keeps five per cell, after merging stream chunks and
 * dropping bare reprs): a cell that printed thousands of outputs must not make every request huge.
 */
export const MAX_OUTPUTS_PER_CELL = 10;

const BARE_REPR = /^<[^\n]*>$/;

function clip(text: string): string {
  return text.length > MAX_OUTPUT_CHARS ? `${headOf(text, MAX_OUTPUT_CHARS)}\n...` : text;
}

/** Keep only textual outputs: images and HTML cost bandwidth and tell a code model little. */
export function outputsForContext(outputs: readonly unknown[]): IOutputPayload[] {
  const kept: IOutputPayload[] = [];
  for (const output of outputs) {
    if (kept.length === MAX_OUTPUTS_PER_CELL) {
      break;
    }
    if (typeof output !== 'object' || output === null) {
      continue;
    }
    const o = output as Record<string, unknown>;
    switch (o.output_type) {
      case 'stream':
        kept.push({
          output_type: 'stream',
          name: typeof o.name === 'string' ? o.name : 'stdout',
          text: clip(joinText(o.text))
        });
        break;
      case 'execute_result':
      case 'display_data': {
        const data = (o.data ?? {}) as Record<string, unknown>;
        const plain = joinText(data['text/plain']);
        // "<Figure size 640x480 with 1 Axes>": the server drops such reprs, so they take no place here.
        if (plain && !BARE_REPR.test(plain.trim())) {
          kept.push({
            output_type: o.output_type,
            data: { 'text/plain': clip(plain) }
          });
        }
        break;
      }
      case 'error':
        kept.push({
          output_type: 'error',
          ename: String(o.ename ?? ''),
          evalue: clip(String(o.evalue ?? ''))
        });
        break;
    }
  }
  return kept;
}

export function notebookRequest(
  cells: readonly ICellSnapshot[],
  activeIndex: number,
  offsetInCodePoints: number,
  includeOutputs: boolean
): INotebookRequest {
  const payload: INotebookCellPayload[] = cells.map(cell => {
    const entry: INotebookCellPayload = {
      cell_type: cell.cellType,
      source: cell.source
    };
    if (includeOutputs && cell.outputs && cell.outputs.length > 0) {
      entry.outputs = outputsForContext(cell.outputs);
    }
    return entry;
  });
  return {
    notebook: { cells: payload },
    cell: activeIndex,
    offset: offsetInCodePoints
  };
}

/**
 * Prefix/suffix around the cursor. A console's executed cells are prepended to
 * the prefix because they are the code the prompt builds on.
 */
export function prefixSuffixRequest(
  text: string,
  jsOffset: number,
  history: readonly string[] = []
): IPrefixSuffixRequest {
  const recent = history.slice(-MAX_CONSOLE_HISTORY_CELLS).filter(s => s.trim());
  const context = recent.length > 0 ? `${recent.join('\n\n')}\n\n` : '';
  return {
    prefix: context + text.slice(0, jsOffset),
    suffix: text.slice(jsOffset)
  };
}
