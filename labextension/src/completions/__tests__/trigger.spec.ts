// Tests when typing asks for a suggestion: not while the cursor is inside or in front of a word.

import { editsInsideWord } from '../trigger';

describe('editsInsideWord', () => {
  it('is true right before a letter, digit or underscore, in any script', () => {
    expect(editsInsideWord('total = values', 'total = valu'.length)).toBe(true);
    expect(editsInsideWord('x = _private', 4)).toBe(true);
    expect(editsInsideWord('n = 42', 4)).toBe(true);
    expect(editsInsideWord('größe = 1', 2)).toBe(true);
    expect(editsInsideWord('x = 𝑥', 4)).toBe(true);
  });

  it('is false at the end of the text, before spaces, brackets, quotes and line breaks', () => {
    for (const after of ['', ' ', ')', ']', '"', "'", '\n', ':', ',', '.']) {
      expect(editsInsideWord(`print(x${after}`, 'print(x'.length)).toBe(false);
    }
  });
});
