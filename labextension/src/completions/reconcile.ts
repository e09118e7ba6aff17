// Decides what of a (possibly still streaming) suggestion is left to show once the user has typed on after the request.

/** The editor text around the cursor when the request was sent. */
export interface ISnapshot {
  before: string;
  after: string;
}

export type Reconciliation =
  /** The user typed along the suggestion (or not at all); `remaining` is what the ghost text should show. */
  | { kind: 'consistent'; typed: string; remaining: string }
  /** The user typed past what has been generated so far, still matching it; more text may catch up. */
  | { kind: 'ahead'; typed: string }
  /** The user typed something else, or edited outside the insertion point: the suggestion is dead. */
  | { kind: 'diverged' };

/**
 * Text inserted at the request's cursor since the snapshot, or null when the
 * edit touched anything else (deleted before the cursor, changed the rest).
 */
export function typedSince(snapshot: ISnapshot, current: string): string | null {
  const { before, after } = snapshot;
  if (current.length < before.length + after.length) {
    return null;
  }
  if (!current.startsWith(before) || !current.endsWith(after)) {
    return null;
  }
  return current.slice(before.length, current.length - after.length);
}

export function reconcile(
  snapshot: ISnapshot,
  current: string,
  suggestion: string
): Reconciliation {
  const typed = typedSince(snapshot, current);
  if (typed === null) {
    return { kind: 'diverged' };
  }
  if (suggestion.startsWith(typed)) {
    return { kind: 'consistent', typed, remaining: suggestion.slice(typed.length) };
  }
  if (typed.startsWith(suggestion)) {
    return { kind: 'ahead', typed };
  }
  return { kind: 'diverged' };
}
