// What JupyterLab's inline completer shows in a widget, read past the public API where that API stops short.

import type { CodeEditor } from '@jupyterlab/codeeditor';
import type { ICompletionProviderManager, IInlineCompletionItem } from '@jupyterlab/completer';
import type { ReadonlyPartialJSONObject } from '@lumino/coreutils';
import type { ISignal } from '@lumino/signaling';

/** JupyterLab's inline completer settings: which inline providers are enabled. */
export const INLINE_COMPLETER_PLUGIN = '@jupyterlab/completer-extension:inline-completer';

/** Each inline provider's switch, by provider id, as those settings hold them. */
export type InlineProviderSwitches = Record<string, { enabled?: boolean } | undefined>;

export function inlineProviderSwitches(
  composite: ReadonlyPartialJSONObject
): InlineProviderSwitches {
  return (composite.providers ?? {}) as InlineProviderSwitches;
}

/**
 * The public inline-completer API can accept all, cycle and tell whether ghost
 * text is shown, but not which candidate is shown. That lives on the widget's
 * completion handler, which the manager keeps privately; read it defensively.
 */
export interface IInlineCompleterView {
  current: IInlineCompletionItem | null;
  editor: CodeEditor.IEditor | null | undefined;
  model?: { suggestionsChanged?: ISignal<unknown, { event: string }> } | null;
}

export function completerOf(
  manager: ICompletionProviderManager,
  widgetId: string
): IInlineCompleterView | null {
  const handlers = (
    manager as unknown as {
      _panelHandlers?: Map<string, { inlineCompleter?: IInlineCompleterView }>;
    }
  )._panelHandlers;
  if (!(handlers instanceof Map)) {
    return null;
  }
  return handlers.get(widgetId)?.inlineCompleter ?? null;
}

/**
 * Whether the widget shows a suggestion that accepting would insert. JupyterLab can drop its
 * candidates while the ghost text stays on screen (it filters them without clearing the view), so
 * "active" alone is not enough: a provider that trusted it would keep a suggestion Tab cannot accept.
 */
export function showsSuggestion(manager: ICompletionProviderManager, widgetId: string): boolean {
  if (!manager.inline?.isActive(widgetId)) {
    return false;
  }
  const completer = completerOf(manager, widgetId);
  return completer === null || completer.current != null;
}

/**
 * Calls `dropped` whenever the widget's inline completer drops what it shows: the cursor moved to
 * another line or back before the request's column, a click away, a selection, an accept. JupyterLab does not tell the provider, and keeps
 * reading a stream it no longer shows to its end. Returns what stops the calls; does nothing
 * where the completer cannot be read.
 */
export function onSuggestionDropped(
  manager: ICompletionProviderManager,
  widgetId: string,
  dropped: () => void
): () => void {
  const signal = completerOf(manager, widgetId)?.model?.suggestionsChanged;
  if (!signal?.connect) {
    return () => undefined;
  }
  const slot = (_sender: unknown, change: { event: string }) => {
    if (change.event === 'clear') {
      dropped();
    }
  };
  signal.connect(slot);
  return () => {
    signal.disconnect(slot);
  };
}
