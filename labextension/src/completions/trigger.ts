// Whether typing at a cursor position should bring up a suggestion at all.

// Letters and digits of any script, and the underscore: what an identifier or a word continues with.
const WORD_START = /^[\p{L}\p{N}_]/u;

/**
 * The cursor sits right before a word character: the user is editing inside a word or in front of
 * one (a rename, a typo fixed), where ghost text only gets in the way and a model run is wasted.
 */
export function editsInsideWord(text: string, jsOffset: number): boolean {
  // Two code units, so that a character outside the Basic Multilingual Plane is read whole.
  return WORD_START.test(text.slice(jsOffset, jsOffset + 2));
}
