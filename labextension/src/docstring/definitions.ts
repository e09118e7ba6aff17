// Finds Python `def`/`class` blocks in a cell and whether they have a docstring, without a parser, robust to strings, brackets and comments.

/** A logical line: physical lines joined by open brackets, triple-quoted strings or backslashes. */
interface ILogicalLine {
  start: number;
  /** Offset of the newline ending the line, or the source length. */
  end: number;
  indent: string;
  /** Offset of the first character that is not whitespace; equals `end` for blank lines. */
  codeStart: number;
  /** Offset just after the last character that is neither whitespace nor comment. */
  codeEnd: number;
  /** First ':' outside brackets, strings and comments. */
  colon: number | null;
  /** Span of a string literal that opens the line, quote characters included. */
  leadingString: { start: number; end: number; quote: string } | null;
}

export interface IDefinition {
  kind: 'def' | 'class';
  name: string;
  /** Start of the first decorator line, or of the header line. */
  start: number;
  /** End of the block: the newline after its last non-blank line, or the source length. */
  end: number;
  /** End of the header's logical line, where a docstring line would be inserted. */
  headerEnd: number;
  headerIndent: string;
  /** Indentation of the body's first statement, or null when the body is empty. */
  bodyIndent: string | null;
  /** `def f(): return 1` has its body on the header line and no room for a docstring. */
  inlineBody: boolean;
  docstring: { start: number; end: number; quote: string } | null;
}

const STRING_PREFIX = /^[rRbBuUfF]{0,2}$/;

function scanLogicalLines(source: string): ILogicalLine[] {
  const lines: ILogicalLine[] = [];
  let i = 0;
  const n = source.length;
  while (i < n) {
    const start = i;
    while (i < n && (source[i] === ' ' || source[i] === '\t')) {
      i++;
    }
    const indent = source.slice(start, i);
    let codeStart = -1;
    let codeEnd = i;
    let colon: number | null = null;
    let leadingString: ILogicalLine['leadingString'] = null;
    let depth = 0;
    while (i < n) {
      const ch = source[i];
      if (ch === '\n') {
        if (depth > 0) {
          i++;
          continue;
        }
        break;
      }
      if (ch === '#') {
        while (i < n && source[i] !== '\n') {
          i++;
        }
        continue;
      }
      if (ch === '\\' && source[i + 1] === '\n') {
        i += 2;
        continue;
      }
      if (ch === ' ' || ch === '\t' || ch === '\r') {
        i++;
        continue;
      }
      if (codeStart === -1) {
        codeStart = i;
      }
      if (ch === '"' || ch === "'") {
        const triple = source.startsWith(ch.repeat(3), i);
        const quote = triple ? ch.repeat(3) : ch;
        const literalStart = i;
        i += quote.length;
        let closed = false;
        while (i < n) {
          if (source.startsWith(quote, i)) {
            closed = true;
            break;
          }
          if (!triple && source[i] === '\n') {
            break; // unterminated: the newline still ends the line
          }
          i += source[i] === '\\' ? 2 : 1;
        }
        i = closed ? i + quote.length : Math.min(i, n);
        const prefixStart = codeStart;
        if (
          leadingString === null &&
          STRING_PREFIX.test(source.slice(prefixStart, literalStart)) &&
          codeEnd <= literalStart
        ) {
          leadingString = { start: prefixStart, end: i, quote };
        }
        codeEnd = i;
        continue;
      }
      if (ch === '(' || ch === '[' || ch === '{') {
        depth++;
      } else if (ch === ')' || ch === ']' || ch === '}') {
        depth = Math.max(0, depth - 1);
      } else if (ch === ':' && depth === 0 && colon === null) {
        colon = i;
      }
      i++;
      codeEnd = i;
    }
    // A string literal only counts as leading when nothing follows it on the line.
    if (leadingString && leadingString.end !== codeEnd) {
      leadingString = null;
    }
    lines.push({
      start,
      end: i,
      indent,
      codeStart: codeStart === -1 ? i : codeStart,
      codeEnd: codeStart === -1 ? i : codeEnd,
      colon,
      leadingString
    });
    if (i >= n) {
      break;
    }
    i++; // the newline
  }
  return lines;
}

const HEADER = /^(?:async[ \t]+)?(def|class)[ \t]+([A-Za-z_\p{L}][\w\p{L}\p{N}]*)/u;

function isBlank(line: ILogicalLine): boolean {
  return line.codeStart === line.end;
}

export function findDefinitions(source: string): IDefinition[] {
  const lines = scanLogicalLines(source);
  const definitions: IDefinition[] = [];
  lines.forEach((line, index) => {
    const code = source.slice(line.codeStart, line.codeEnd);
    const header = HEADER.exec(code);
    if (!header || line.colon === null) {
      return;
    }
    let start = line.start;
    for (let k = index - 1; k >= 0; k--) {
      const previous = lines[k];
      if (previous.indent !== line.indent || source[previous.codeStart] !== '@') {
        break;
      }
      start = previous.start;
    }
    const inlineBody = line.colon + 1 < line.codeEnd;
    let end = line.end;
    let bodyIndent: string | null = null;
    let docstring: IDefinition['docstring'] = null;
    for (let k = index + 1; k < lines.length; k++) {
      const next = lines[k];
      if (isBlank(next)) {
        continue;
      }
      if (next.indent.length <= line.indent.length || inlineBody) {
        break;
      }
      if (bodyIndent === null) {
        bodyIndent = next.indent;
        docstring = next.leadingString;
      }
      end = next.end;
    }
    definitions.push({
      kind: header[1] as 'def' | 'class',
      name: header[2],
      start,
      end,
      headerEnd: line.end,
      headerIndent: line.indent,
      bodyIndent,
      inlineBody,
      docstring
    });
  });
  return definitions;
}

export type DocstringTargets =
  | { kind: 'targets'; definitions: IDefinition[] }
  /** The cursor is in a definition that already has a docstring. */
  | { kind: 'documented'; definition: IDefinition }
  | { kind: 'none' };

/**
 * The definition around the cursor (the innermost), or, when the cursor is in
 * no definition, every undocumented one in the cell. One-line definitions
 * (`def f(): pass`) have no room for a docstring and are left out.
 */
export function docstringTargets(source: string, cursor: number): DocstringTargets {
  const definitions = findDefinitions(source).filter(d => !d.inlineBody);
  const around = definitions
    .filter(d => d.start <= cursor && cursor <= d.end)
    .sort((a, b) => b.start - a.start)[0];
  if (around) {
    return around.docstring
      ? { kind: 'documented', definition: around }
      : { kind: 'targets', definitions: [around] };
  }
  const undocumented = definitions.filter(d => !d.docstring);
  return undocumented.length > 0
    ? { kind: 'targets', definitions: undocumented }
    : { kind: 'none' };
}
