// Plans the docstrings for a cell: which definitions, one model request each, and the exact insertions; nothing touches the cell until all succeed.

import type { ICompletionResult, IPrefixSuffixRequest } from '../client/protocol';
import { docstringTargets } from './definitions';
import { detectStyle, docstringPrompt, formatDocstring } from './prompt';

export interface IDocstringSettings {
  maxNewTokens: number;
  temperature: number;
}

export const DEFAULT_DOCSTRING_SETTINGS: IDocstringSettings = {
  maxNewTokens: 160,
  temperature: 0.2
};

export function readDocstringSettings(
  composite: Readonly<Record<string, unknown>>
): IDocstringSettings {
  const number = (value: unknown, fallback: number, min: number) =>
    typeof value === 'number' && Number.isFinite(value) && value >= min ? value : fallback;
  return {
    maxNewTokens: number(composite.maxNewTokens, DEFAULT_DOCSTRING_SETTINGS.maxNewTokens, 1),
    temperature: number(composite.temperature, DEFAULT_DOCSTRING_SETTINGS.temperature, 0)
  };
}

export interface IInsertion {
  at: number;
  text: string;
  name: string;
}

export type DocstringPlan =
  { kind: 'insert'; insertions: IInsertion[] } | { kind: 'nothing'; reason: string };

export interface IPlanOptions {
  source: string;
  /** Cursor offset in `source` (JavaScript string index). */
  cursor: number;
  /** Sources of the code cells above this one, oldest first. */
  codeAbove: readonly string[];
  /** Sources of every code cell in the notebook, for the docstring style. */
  notebookCode: readonly string[];
  /** Whether the model can fill in the middle; if not, it gets the prefix only. */
  infilling: boolean;
  /** The model's context in tokens, to size the prompt. */
  maxContextTokens: number;
  settings: IDocstringSettings;
  complete: (request: IPrefixSuffixRequest) => Promise<ICompletionResult>;
}

/** Characters per token is about 3 for code; leave a quarter of the room to the suffix. */
function promptBudget(
  maxContextTokens: number,
  maxNewTokens: number
): { prefix: number; suffix: number } {
  const chars = Math.max(2000, (maxContextTokens - maxNewTokens) * 3);
  return { prefix: Math.floor(chars * 0.75), suffix: Math.floor(chars * 0.25) };
}

export async function planDocstrings(options: IPlanOptions): Promise<DocstringPlan> {
  const { source, settings } = options;
  const found = docstringTargets(source, options.cursor);
  if (found.kind === 'none') {
    return { kind: 'nothing', reason: 'No undocumented function or class in this cell.' };
  }
  if (found.kind === 'documented') {
    return { kind: 'nothing', reason: `${found.definition.name} already has a docstring.` };
  }
  const style = detectStyle(options.notebookCode);
  const budget = promptBudget(options.maxContextTokens, settings.maxNewTokens);
  const insertions: IInsertion[] = [];
  for (const definition of found.definitions) {
    const prompt = docstringPrompt({
      source,
      definition,
      style,
      precedingCode: options.codeAbove.join('\n\n'),
      maxPrefixChars: budget.prefix,
      maxSuffixChars: budget.suffix
    });
    const result = await options.complete({
      prefix: prompt.prefix,
      suffix: options.infilling ? prompt.suffix : '',
      max_new_tokens: settings.maxNewTokens,
      temperature: settings.temperature,
      mode: 'none',
      stop: [prompt.quote]
    });
    const text = formatDocstring(result.text, prompt.indent, prompt.quote);
    if (text === null) {
      throw new Error(`The model returned no docstring for ${definition.name}.`);
    }
    insertions.push({ at: prompt.insertAt, text, name: definition.name });
  }
  return { kind: 'insert', insertions };
}

/** The part of a cell's shared model that edits need; tests give a string-backed one. */
export interface IEditableSource {
  transact(edit: () => void): void;
  updateSource(start: number, end: number, value: string): void;
  undoManager?: { stopCapturing(): void } | null;
}

/**
 * Insert every docstring in one transaction, fenced by `stopCapturing` so the
 * undo manager neither merges it with the typing before nor with what follows:
 * one Ctrl+Z removes exactly what was generated. Last-first keeps earlier offsets valid.
 */
export function insertAsOneEdit(target: IEditableSource, insertions: readonly IInsertion[]): void {
  target.undoManager?.stopCapturing();
  target.transact(() => {
    for (const insertion of [...insertions].sort((a, b) => b.at - a.at)) {
      target.updateSource(insertion.at, insertion.at, insertion.text);
    }
  });
  target.undoManager?.stopCapturing();
}
