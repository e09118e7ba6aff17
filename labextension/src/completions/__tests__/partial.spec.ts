// Tests where "accept next word" and "accept next line" cut a suggestion.

import { nextLine, nextWord } from '../partial';

function splitAll(text: string, split: (t: string) => string): string[] {
  const parts: string[] = [];
  let rest = text;
  while (rest) {
    const part = split(rest);
    expect(part.length).toBeGreaterThan(0);
    parts.push(part);
    rest = rest.slice(part.length);
  }
  return parts;
}

describe('nextWord', () => {
  it('takes identifiers and punctuation runs separately, with leading space', () => {
    expect(splitAll('foo_bar(baz, qux=1)', nextWord)).toEqual([
      'foo_bar',
      '(',
      'baz',
      ',',
      ' qux',
      '=',
      '1',
      ')'
    ]);
  });

  it('keeps a line break and indentation with the word after it', () => {
    expect(nextWord('\n    return x')).toBe('\n    return');
  });

  it('treats non-ASCII letters and digits as word characters', () => {
    expect(nextWord('naïve_λ2 = 1')).toBe('naïve_λ2');
  });

  it('groups operator runs', () => {
    expect(nextWord(' **= 2')).toBe(' **=');
  });

  it('returns trailing whitespace whole so accepting never stalls', () => {
    expect(nextWord('  \n')).toBe('  \n');
  });

  it('never splits a surrogate pair', () => {
    expect(nextWord('😀😀 x')).toBe('😀😀');
  });
});

describe('nextLine', () => {
  it('takes the rest of the current line, leaving the break for the next press', () => {
    expect(splitAll('a = 1\nb = 2\nc = 3', nextLine)).toEqual(['a = 1', '\nb = 2', '\nc = 3']);
  });

  it('takes blank lines along with the next visible line', () => {
    expect(nextLine('\n\n    return x\n')).toBe('\n\n    return x');
  });

  it('takes whitespace-only suggestions whole', () => {
    expect(nextLine('\n  ')).toBe('\n  ');
  });
});
