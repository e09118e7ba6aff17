// Builds the fill-in-the-middle prompt for a docstring in the notebook's own style, and shapes what the model returns into an insertable docstring.

import { headOf, tailOf } from '../codepoints';
import { findDefinitions, IDefinition } from './definitions';

export type Quote = '"""' | "'''";

export interface IDocstringStyle {
  quote: Quote;
  /** One indentation step, for bodies the cell has not written yet. */
  indentUnit: string;
  /** A documented definition from the notebook, shown to the model so it imitates the style. */
  exemplar: string | null;
}

/** An exemplar longer than this costs more context than its style teaches. */
const MAX_EXEMPLAR_CHARS = 1500;

function mostCommon<T>(values: T[], fallback: T): T {
  const counts = new Map<T, number>();
  let best = fallback;
  let bestCount = 0;
  for (const value of values) {
    const count = (counts.get(value) ?? 0) + 1;
    counts.set(value, count);
    if (count > bestCount) {
      best = value;
      bestCount = count;
    }
  }
  return best;
}

export function detectStyle(sources: readonly string[]): IDocstringStyle {
  const quotes: Quote[] = [];
  const steps: string[] = [];
  let exemplar: string | null = null;
  for (const source of sources) {
    for (const definition of findDefinitions(source)) {
      if (
        definition.bodyIndent !== null &&
        definition.bodyIndent.startsWith(definition.headerIndent)
      ) {
        const step = definition.bodyIndent.slice(definition.headerIndent.length);
        if (step) {
          steps.push(step);
        }
      }
      const docstring = definition.docstring;
      if (!docstring) {
        continue;
      }
      const literal = source.slice(docstring.start, docstring.end);
      if (literal.includes('"""')) {
        quotes.push('"""');
      } else if (literal.includes("'''")) {
        quotes.push("'''");
      }
      // Header and docstring only; `...` stands for the body so the exemplar still reads as Python.
      const candidate = `${source.slice(definition.start, docstring.end)}\n${definition.bodyIndent ?? ''}...`;
      // The longest docstring shows the most of the style (sections, types, examples).
      if (
        candidate.length <= MAX_EXEMPLAR_CHARS &&
        (exemplar === null || literal.length > exemplarDocLength(exemplar))
      ) {
        exemplar = candidate;
      }
    }
  }
  return {
    quote: mostCommon<Quote>(quotes, '"""'),
    indentUnit: mostCommon(steps, '    '),
    exemplar
  };
}

function exemplarDocLength(exemplar: string): number {
  const open = exemplar.search(/"""|'''/);
  return open === -1 ? 0 : exemplar.length - open;
}

export interface IDocstringPrompt {
  prefix: string;
  suffix: string;
  /** Offset in the cell source where the formatted docstring goes. */
  insertAt: number;
  indent: string;
  quote: Quote;
}

export interface IPromptOptions {
  source: string;
  definition: IDefinition;
  style: IDocstringStyle;
  /** Code of the cells above, oldest first: what the function builds on. */
  precedingCode: string;
  maxPrefixChars: number;
  maxSuffixChars: number;
}

/**
 * Prefix: context, then the cell up to the end of the header, a new line at
 * body indentation and the opening quotes. Suffix: the closing quotes and the
 * body. The model writes what goes between.
 */
export function docstringPrompt(options: IPromptOptions): IDocstringPrompt {
  const { source, definition, style } = options;
  const indent = definition.bodyIndent ?? definition.headerIndent + style.indentUnit;
  const insertAt = definition.headerEnd;
  const head = `${source.slice(0, insertAt)}\n${indent}${style.quote}`;
  let context = options.precedingCode ? `${options.precedingCode}\n\n` : '';
  if (style.exemplar && !context.includes(style.exemplar) && !head.includes(style.exemplar)) {
    context = `${style.exemplar}\n\n\n${context}`;
  }
  let prefix = context + head;
  prefix = tailOf(prefix, options.maxPrefixChars);
  const suffix = headOf(style.quote + source.slice(insertAt), options.maxSuffixChars);
  return { prefix, suffix, insertAt, indent, quote: style.quote };
}

/**
 * Turn generated text into the exact text to insert after the header: cut at
 * the closing quotes, re-indent continuation lines to the body, close a
 * multi-line docstring on its own line. Null when nothing usable came back.
 */
export function formatDocstring(generated: string, indent: string, quote: Quote): string | null {
  const closing = generated.indexOf(quote);
  const raw = (closing === -1 ? generated : generated.slice(0, closing)).replace(/\s+$/u, '');
  if (!raw.trim()) {
    return null;
  }
  const [first, ...rest] = raw.split('\n').map(line => line.replace(/\s+$/u, ''));
  if (rest.length === 0) {
    // A trailing backslash would escape the closing quote.
    const line = first.trim().replace(/\\+$/u, '');
    return line ? `\n${indent}${quote}${line}${quote}` : null;
  }
  const common = Math.min(
    ...rest.filter(line => line.trim()).map(line => line.length - line.trimStart().length)
  );
  const body = rest.map(line => (line.trim() ? indent + line.slice(common) : ''));
  return `\n${indent}${quote}${first.trimStart()}\n${body.join('\n')}\n${indent}${quote}`;
}
