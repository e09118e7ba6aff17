// Tests the docstring prompt (in the middle, in the notebook's style), the shaping of model output, and that failures change nothing.

import type { ICompletionResult, IPrefixSuffixRequest } from '../../client/protocol';
import { findDefinitions } from '../definitions';
import { IEditableSource, IInsertion, insertAsOneEdit, planDocstrings } from '../generate';
import { detectStyle, docstringPrompt, formatDocstring } from '../prompt';

const googleCell = `def load(path):
    """Load a table.

    Args:
        path: Where the CSV file is.

    Returns:
        The rows.
    """
    return open(path).read()
`;

/** A cell source with undo fencing recorded, standing in for JupyterLab's shared model. */
class StringSource implements IEditableSource {
  log: string[] = [];
  constructor(public text: string) {}
  undoManager = { stopCapturing: () => this.log.push('fence') };
  transact(edit: () => void): void {
    this.log.push('begin');
    edit();
    this.log.push('end');
  }
  updateSource(start: number, end: number, value: string): void {
    this.text = this.text.slice(0, start) + value + this.text.slice(end);
  }
}

const answer = (text: string): ICompletionResult => ({
  text,
  choices: [text],
  usage: {},
  timings: {}
});

describe('detectStyle', () => {
  it('finds the quote, indentation step and a documented exemplar', () => {
    const style = detectStyle([googleCell, 'x = 1']);
    expect(style.quote).toBe('"""');
    expect(style.indentUnit).toBe('    ');
    expect(style.exemplar).toContain('Args:');
    expect(style.exemplar).not.toContain('open(path)');
  });

  it("prefers the notebook's quotes and indentation", () => {
    const style = detectStyle([
      "def f():\n  '''One.'''\n  return 1\n",
      "def g():\n  '''Two.'''\n  pass\n"
    ]);
    expect(style.quote).toBe("'''");
    expect(style.indentUnit).toBe('  ');
  });

  it('falls back to PEP 8 defaults', () => {
    expect(detectStyle([])).toEqual({ quote: '"""', indentUnit: '    ', exemplar: null });
  });
});

describe('docstringPrompt', () => {
  const source = 'def add(a, b):\n    return a + b\n';
  const [definition] = findDefinitions(source);

  it('puts the opening quotes at the end of the prefix and the body after the closing ones', () => {
    const prompt = docstringPrompt({
      source,
      definition,
      style: detectStyle([googleCell]),
      precedingCode: 'import os',
      maxPrefixChars: 10000,
      maxSuffixChars: 10000
    });
    expect(prompt.prefix.endsWith('import os\n\ndef add(a, b):\n    """')).toBe(true);
    expect(prompt.prefix).toContain('Args:');
    expect(prompt.suffix).toBe('"""\n    return a + b\n');
    expect(source.slice(0, prompt.insertAt)).toBe('def add(a, b):');
  });

  it('keeps the end of the prefix when it must be cut', () => {
    const prompt = docstringPrompt({
      source,
      definition,
      style: detectStyle([]),
      precedingCode: 'x = 1\n'.repeat(1000),
      maxPrefixChars: 40,
      maxSuffixChars: 5
    });
    expect(prompt.prefix.length).toBe(40);
    expect(prompt.prefix.endsWith('def add(a, b):\n    """')).toBe(true);
    expect(prompt.suffix).toBe('"""\n ');
  });

  it('never cuts the context or the body inside a surrogate pair', () => {
    const emoji = '\u{1F600}';
    const head = 'def add(a, b):\n    """';
    const prompt = docstringPrompt({
      source: `def add(a, b):\n    return '${emoji}'\n`,
      definition,
      style: detectStyle([]),
      precedingCode: `x = '${emoji}'`,
      maxPrefixChars: head.length + 4,
      maxSuffixChars: 17
    });
    expect(prompt.prefix).toBe(`'\n\n${head}`);
    expect(prompt.suffix).toBe(`"""\n    return '`);
  });

  it('indents a body the cell has not written yet one step deeper', () => {
    const [, method] = findDefinitions('class A:\n  def f(self):');
    const prompt = docstringPrompt({
      source: 'class A:\n  def f(self):',
      definition: method,
      style: { quote: '"""', indentUnit: '  ', exemplar: null },
      precedingCode: '',
      maxPrefixChars: 1000,
      maxSuffixChars: 1000
    });
    expect(prompt.indent).toBe('    ');
  });
});

describe('formatDocstring', () => {
  it('cuts at the closing quotes and keeps one-liners on one line', () => {
    expect(formatDocstring('Add two numbers."""\n    return a', '    ', '"""')).toBe(
      '\n    """Add two numbers."""'
    );
  });

  it('re-indents continuation lines to the body and closes on its own line', () => {
    expect(formatDocstring('Add.\n\nArgs:\n    a: first\n', '        ', '"""')).toBe(
      '\n        """Add.\n\n        Args:\n            a: first\n        """'
    );
  });

  it('keeps correctly indented output as it is', () => {
    expect(formatDocstring('Add.\n\n    Returns:\n        Sum.\n    ', '    ', '"""')).toBe(
      '\n    """Add.\n\n    Returns:\n        Sum.\n    """'
    );
  });

  it('gives null for empty output', () => {
    expect(formatDocstring('  \n """', '    ', '"""')).toBeNull();
  });

  it('drops a trailing backslash that would escape the closing quotes', () => {
    expect(formatDocstring('Path C:\\', '    ', '"""')).toBe('\n    """Path C:"""');
  });
});

describe('planDocstrings', () => {
  const source = 'def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n';
  const base = {
    source,
    cursor: source.length,
    codeAbove: [],
    notebookCode: [source],
    infilling: true,
    maxContextTokens: 2048,
    settings: { maxNewTokens: 64, temperature: 0.2 }
  };

  it('asks once per undocumented definition, in the middle, with mode none and a quote stop', async () => {
    const requests: IPrefixSuffixRequest[] = [];
    const plan = await planDocstrings({
      ...base,
      complete: async request => {
        requests.push(request);
        return answer(requests.length === 1 ? 'Add."""' : 'Subtract.');
      }
    });
    expect(requests).toHaveLength(2);
    expect(requests[0]).toMatchObject({ mode: 'none', stop: ['"""'], max_new_tokens: 64 });
    expect(requests[0].prefix.endsWith('def add(a, b):\n    """')).toBe(true);
    expect(requests[0].suffix.startsWith('"""\n    return a + b')).toBe(true);

    const cellSource = new StringSource(source);
    expect(plan.kind).toBe('insert');
    insertAsOneEdit(cellSource, (plan as { insertions: IInsertion[] }).insertions);
    expect(cellSource.text).toBe(
      'def add(a, b):\n    """Add."""\n    return a + b\n\ndef sub(a, b):\n    """Subtract."""\n    return a - b\n'
    );
    expect(cellSource.log).toEqual(['fence', 'begin', 'end', 'fence']);
  });

  it('sends the prefix only to a model that cannot infill', async () => {
    const requests: IPrefixSuffixRequest[] = [];
    await planDocstrings({
      ...base,
      cursor: 3,
      infilling: false,
      complete: async request => {
        requests.push(request);
        return answer('Add.');
      }
    });
    expect(requests).toHaveLength(1);
    expect(requests[0].suffix).toBe('');
  });

  it('fails as a whole, so the cell is left untouched, when any request fails or returns nothing', async () => {
    await expect(
      planDocstrings({ ...base, complete: async () => Promise.reject(new Error('400: bad input')) })
    ).rejects.toThrow('400: bad input');
    let calls = 0;
    await expect(
      planDocstrings({ ...base, complete: async () => answer(++calls === 1 ? 'Add.' : '"""') })
    ).rejects.toThrow(/no docstring for sub/);
  });

  it('explains when there is nothing to do', async () => {
    const complete = jest.fn();
    const documented = 'def f():\n    """Doc."""\n    pass\n';
    expect(await planDocstrings({ ...base, source: documented, cursor: 3, complete })).toEqual({
      kind: 'nothing',
      reason: 'f already has a docstring.'
    });
    expect(await planDocstrings({ ...base, source: 'x = 1', cursor: 0, complete })).toMatchObject({
      kind: 'nothing'
    });
    expect(complete).not.toHaveBeenCalled();
  });
});
