// Tests cutting text by UTF-16 length without leaving half of a surrogate pair behind.

import { headOf, tailOf } from '../codepoints';

const EMOJI = '\u{1F600}'; // two UTF-16 units

describe('headOf', () => {
  it('keeps short text whole', () => {
    expect(headOf('abc', 3)).toBe('abc');
  });

  it('cuts at the limit', () => {
    expect(headOf('abcdef', 4)).toBe('abcd');
  });

  it('drops a pair the limit would split', () => {
    expect(headOf(`abc${EMOJI}`, 4)).toBe('abc');
    expect(headOf(`abc${EMOJI}d`, 5)).toBe(`abc${EMOJI}`);
  });
});

describe('tailOf', () => {
  it('keeps the end', () => {
    expect(tailOf('abcdef', 2)).toBe('ef');
    expect(tailOf('ab', 5)).toBe('ab');
  });

  it('drops a pair the limit would split', () => {
    expect(tailOf(`${EMOJI}abc`, 4)).toBe('abc');
    expect(tailOf(`x${EMOJI}abc`, 5)).toBe(`${EMOJI}abc`);
  });
});
