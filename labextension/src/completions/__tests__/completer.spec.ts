// Tests reading whether JupyterLab's inline completer still has a suggestion to accept.

import type { ICompletionProviderManager } from '@jupyterlab/completer';
import { showsSuggestion } from '../completer';

function manager(active: boolean, handlers?: Map<string, unknown>): ICompletionProviderManager {
  return {
    inline: { isActive: () => active },
    _panelHandlers: handlers
  } as unknown as ICompletionProviderManager;
}

describe('showsSuggestion', () => {
  it('is false when no ghost text is active', () => {
    expect(showsSuggestion(manager(false), 'nb')).toBe(false);
  });

  it('is false when JupyterLab dropped its candidates but left the ghost text active', () => {
    const handlers = new Map([['nb', { inlineCompleter: { current: null, editor: null } }]]);
    expect(showsSuggestion(manager(true, handlers), 'nb')).toBe(false);
  });

  it('is true while a candidate is current', () => {
    const current = { insertText: 'range(10)' };
    const handlers = new Map([['nb', { inlineCompleter: { current, editor: null } }]]);
    expect(showsSuggestion(manager(true, handlers), 'nb')).toBe(true);
  });

  it('trusts "active" when the handler cannot be read', () => {
    expect(showsSuggestion(manager(true), 'nb')).toBe(true);
  });
});
