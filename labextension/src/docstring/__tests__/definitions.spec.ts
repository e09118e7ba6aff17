// Tests finding def/class blocks, their docstrings and the docstring targets around the cursor.

import { docstringTargets, findDefinitions } from '../definitions';

const cell = `import math

@cache
def area(radius: float,
         scale: float = 1.0) -> float:  # (r, s) -> area
    return math.pi * radius ** 2 * scale

class Circle:
    """A circle."""

    def __init__(self, r):
        self.r = r

    async def grow(self, by=lambda: 1):
        s = "def not_a_function():"
        return self.r + by()

def one_liner(): return 1
`;

describe('findDefinitions', () => {
  const found = findDefinitions(cell);

  it('finds functions, methods and classes with their names and kinds', () => {
    expect(found.map(d => `${d.kind} ${d.name}`)).toEqual([
      'def area',
      'class Circle',
      'def __init__',
      'def grow',
      'def one_liner'
    ]);
  });

  it('spans a multi-line signature and starts at the decorator', () => {
    const area = found[0];
    expect(cell.slice(area.start).startsWith('@cache\ndef area')).toBe(true);
    expect(cell.slice(0, area.headerEnd).endsWith('-> float:  # (r, s) -> area')).toBe(true);
    expect(area.bodyIndent).toBe('    ');
    expect(area.docstring).toBeNull();
    expect(cell.slice(area.start, area.end).trimEnd().endsWith('* scale')).toBe(true);
  });

  it('sees an existing docstring and the block of a class', () => {
    const circle = found[1];
    expect(circle.docstring && cell.slice(circle.docstring.start, circle.docstring.end)).toBe(
      '"""A circle."""'
    );
    expect(cell.slice(circle.start, circle.end).trimEnd().endsWith('return self.r + by()')).toBe(
      true
    );
  });

  it('ignores colons in lambdas and keywords inside strings', () => {
    const grow = found[3];
    expect(grow.headerIndent).toBe('    ');
    expect(grow.bodyIndent).toBe('        ');
    expect(found.some(d => d.name === 'not_a_function')).toBe(false);
  });

  it('marks one-line definitions', () => {
    expect(found[4].inlineBody).toBe(true);
  });

  it('recognises prefixed and single-quoted docstrings, not assignments', () => {
    const [a, b, c] = findDefinitions(
      "def a():\n    r'''raw'''\ndef b():\n    'x'\ndef c():\n    x = 'no'\n"
    );
    expect(a.docstring?.quote).toBe("'''");
    expect(b.docstring?.quote).toBe("'");
    expect(c.docstring).toBeNull();
  });

  it('treats a string followed by more code as no docstring', () => {
    const [f] = findDefinitions('def f():\n    "a".join(x)\n');
    expect(f.docstring).toBeNull();
  });

  it('handles a header with no body yet and an empty source', () => {
    const [f] = findDefinitions('def f(x):');
    expect(f.bodyIndent).toBeNull();
    expect(findDefinitions('')).toEqual([]);
  });

  it('survives an unterminated string', () => {
    expect(findDefinitions('x = "oops\ndef f():\n    pass\n').map(d => d.name)).toEqual(['f']);
  });
});

describe('docstringTargets', () => {
  it('targets the innermost definition around the cursor', () => {
    const cursor = cell.indexOf('self.r = r');
    const targets = docstringTargets(cell, cursor);
    expect(targets.kind === 'targets' && targets.definitions.map(d => d.name)).toEqual([
      '__init__'
    ]);
  });

  it('reports a documented definition at the cursor', () => {
    const targets = docstringTargets(cell, cell.indexOf('class Circle') + 3);
    expect(targets).toMatchObject({ kind: 'documented', definition: { name: 'Circle' } });
  });

  it('targets every undocumented definition when the cursor is outside them', () => {
    const targets = docstringTargets(cell, 0);
    expect(targets.kind === 'targets' && targets.definitions.map(d => d.name)).toEqual([
      'area',
      '__init__',
      'grow'
    ]);
  });

  it('says when there is nothing to document', () => {
    expect(docstringTargets('x = 1\n', 0)).toEqual({ kind: 'none' });
  });
});
