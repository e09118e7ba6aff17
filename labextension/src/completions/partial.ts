// Splits the head off a suggestion for "accept next word" and "accept next line", which JupyterLab's accept-all lacks.

/** Identifier characters in any script, so `naïve_λ2` is one word. */
const WORD_CHAR = /[\p{L}\p{N}_]/u;

/**
 * The next word of `suggestion`: leading whitespace (newlines and indentation
 * included, since accepting "nothing visible" would feel stuck), then either a
 * run of identifier characters or a run of other non-space characters, so
 * `foo.bar(x)` is taken as `foo`, `.`, `bar`, `(`, `x`, `)`.
 */
export function nextWord(suggestion: string): string {
  const chars = Array.from(suggestion);
  let end = 0;
  while (end < chars.length && /\s/u.test(chars[end])) {
    end++;
  }
  if (end === chars.length) {
    return suggestion;
  }
  const isWord = WORD_CHAR.test(chars[end]);
  while (end < chars.length && !/\s/u.test(chars[end]) && WORD_CHAR.test(chars[end]) === isWord) {
    end++;
  }
  return chars.slice(0, end).join('');
}

/**
 * The next line of `suggestion`: up to, not including, the first line break
 * that follows visible text. A suggestion that starts on a new line yields that
 * break plus the following line, so every press shows one more line in the cell
 * and the remainder still starts with its own line break.
 */
export function nextLine(suggestion: string): string {
  const firstVisible = suggestion.search(/\S/u);
  if (firstVisible === -1) {
    return suggestion;
  }
  const lineBreak = suggestion.indexOf('\n', firstVisible);
  return lineBreak === -1 ? suggestion : suggestion.slice(0, lineBreak);
}
