// Cutting text to a length in UTF-16 units without splitting a surrogate pair, which the server refuses as not text.

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

function isLowSurrogate(code: number): boolean {
  return code >= 0xdc00 && code <= 0xdfff;
}

/** At most `limit` units from the start; one fewer when the cut would split a pair. */
export function headOf(text: string, limit: number): string {
  if (text.length <= limit) {
    return text;
  }
  const end = limit > 0 && isHighSurrogate(text.charCodeAt(limit - 1)) ? limit - 1 : limit;
  return text.slice(0, end);
}

/** At most `limit` units from the end; one fewer when the cut would split a pair. */
export function tailOf(text: string, limit: number): string {
  if (text.length <= limit) {
    return text;
  }
  const start = text.length - limit;
  return text.slice(isLowSurrogate(text.charCodeAt(start)) ? start + 1 : start);
}
