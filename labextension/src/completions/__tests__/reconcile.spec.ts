// Tests how typing after a request is reconciled with the suggestion: along it, ahead of it, or past it.

import { reconcile, typedSince } from '../reconcile';

const snapshot = { before: 'def add(a, b):\n    ret', after: '\n\nprint(1)' };
const at = (typed: string) => snapshot.before + typed + snapshot.after;

describe('typedSince', () => {
  it('finds text inserted at the cursor', () => {
    expect(typedSince(snapshot, at(''))).toBe('');
    expect(typedSince(snapshot, at('urn'))).toBe('urn');
  });

  it('gives null for deletions and edits elsewhere', () => {
    expect(typedSince(snapshot, 'def add(a, b):\n    re' + snapshot.after)).toBeNull();
    expect(typedSince(snapshot, at('urn').replace('print(1)', 'print(2)'))).toBeNull();
  });

  it('does not mistake overlapping before/after for an insertion', () => {
    expect(typedSince({ before: 'aa', after: 'aa' }, 'aaa')).toBeNull();
  });
});

describe('reconcile', () => {
  const suggestion = 'urn a + b';

  it('shows the whole suggestion when nothing was typed', () => {
    expect(reconcile(snapshot, at(''), suggestion)).toEqual({
      kind: 'consistent',
      typed: '',
      remaining: 'urn a + b'
    });
  });

  it('shows the rest when the user typed along', () => {
    expect(reconcile(snapshot, at('urn a'), suggestion)).toMatchObject({
      kind: 'consistent',
      remaining: ' + b'
    });
  });

  it('is ahead when the user typed past the text generated so far but along it', () => {
    expect(reconcile(snapshot, at('urn a + b + c'), suggestion)).toEqual({
      kind: 'ahead',
      typed: 'urn a + b + c'
    });
  });

  it('diverges when the user typed something else', () => {
    expect(reconcile(snapshot, at('urn b'), suggestion)).toEqual({ kind: 'diverged' });
  });

  it('diverges when the user deleted before the cursor', () => {
    expect(reconcile(snapshot, snapshot.before.slice(0, -1) + snapshot.after, suggestion)).toEqual({
      kind: 'diverged'
    });
  });
});
