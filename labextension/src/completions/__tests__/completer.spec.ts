// Tests reading whether JupyterLab's inline completer still has a suggestion to accept.

import type { ICompletionProviderManager } from '@jupyterlab/completer';
import { Signal } from '@lumino/signaling';
import { onSuggestionDropped, showsSuggestion } from '../completer';

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

describe('onSuggestionDropped', () => {
  function completerModel() {
    const model = { suggestionsChanged: new Signal<unknown, { event: string }>({}) };
    const handlers = new Map([['nb', { inlineCompleter: { current: null, editor: null, model } }]]);
    return { model, manager: manager(true, handlers) };
  }

  it('calls back when the ghost text is cleared, not when it is set or appended to', () => {
    const { model, manager: withModel } = completerModel();
    const dropped = jest.fn();
    onSuggestionDropped(withModel, 'nb', dropped);
    model.suggestionsChanged.emit({ event: 'set' });
    model.suggestionsChanged.emit({ event: 'append' });
    expect(dropped).not.toHaveBeenCalled();
    model.suggestionsChanged.emit({ event: 'clear' });
    expect(dropped).toHaveBeenCalledTimes(1);
  });

  it('stops calling back once told to', () => {
    const { model, manager: withModel } = completerModel();
    const dropped = jest.fn();
    const stop = onSuggestionDropped(withModel, 'nb', dropped);
    stop();
    model.suggestionsChanged.emit({ event: 'clear' });
    expect(dropped).not.toHaveBeenCalled();
  });

  it('does nothing where the completer cannot be read', () => {
    expect(() => onSuggestionDropped(manager(true), 'nb', jest.fn())()).not.toThrow();
  });
});
