// The inline completion provider JupyterLab's ghost text asks for Code Llama suggestions: debounced, streamed, cancelled when typed past.

import type { CodeEditor } from '@jupyterlab/codeeditor';
import {
  CompletionHandler,
  IInlineCompletionContext,
  IInlineCompletionItem,
  IInlineCompletionList,
  IInlineCompletionProvider,
  InlineCompletionTriggerKind
} from '@jupyterlab/completer';
import { Text } from '@jupyterlab/coreutils';
import type { ISettingRegistry } from '@jupyterlab/settingregistry';
import type { Widget } from '@lumino/widgets';
import type { ICodeLlamaClient } from '../tokens';
import { ICompletionSettings, isEnabledFor, MIN_TEMPERATURE_FOR_CANDIDATES } from './settings';
import { LiveSuggestion } from './suggestion';
import { completionTarget, ICompletionTarget } from './target';
import { editsInsideWord } from './trigger';

export const PROVIDER_ID = 'jupyter-codellama';

/**
 * Rejecting a fetch, unlike answering with no items, leaves the ghost text on
 * screen; that is what a superseded or redundant request should do.
 */
class KeepCurrentSuggestion extends Error {}

/** The editor a request was made for still has the focus and is still its widget's active one. */
function isStillEdited(target: ICompletionTarget, widget: Widget): boolean {
  return target.editor.hasFocus() && completionTarget(widget)?.editor === target.editor;
}

/** What is known about one editor (a cell, a file, a console prompt). */
interface IEditorState {
  latestFetch: number;
  suggestion: LiveSuggestion | null;
}

/** A suggestion as listed to JupyterLab, which keeps (and mutates) the very item objects returned. */
interface IListedSuggestion {
  suggestion: LiveSuggestion;
  invoked: boolean;
  items: Map<number, IInlineCompletionItem>;
}

/** Where JupyterLab draws its inline completer's toolbar (cycle, accept): focus there is not leaving. */
const INLINE_COMPLETER_CLASS = 'jp-InlineCompleter';

/**
 * Stop generating once the editor loses the focus (another cell, Shift+Enter, a click elsewhere):
 * JupyterLab drops the ghost text then, and the server, which runs one generation at a time,
 * would otherwise finish a suggestion nobody can see before the next one starts.
 */
function stopWhenLeft(suggestion: LiveSuggestion, editor: CodeEditor.IEditor): void {
  const host = editor.host as HTMLElement | undefined;
  if (!host?.addEventListener) {
    return;
  }
  const onFocusOut = (event: FocusEvent) => {
    const next = event.relatedTarget as Element | null;
    if (next && (host.contains(next) || next.closest?.(`.${INLINE_COMPLETER_CLASS}`))) {
      return; // still in the editor, or on the completer's own toolbar
    }
    suggestion.cancel();
  };
  host.addEventListener('focusout', onFocusOut);
  void suggestion.settled().then(() => host.removeEventListener('focusout', onFocusOut));
}

export interface IShownSuggestion {
  suggestion: LiveSuggestion;
  editor: CodeEditor.IEditor;
}

export class CodeLlamaInlineProvider implements IInlineCompletionProvider {
  readonly identifier = PROVIDER_ID;
  readonly name = 'Code Llama';

  constructor(options: CodeLlamaInlineProvider.IOptions) {
    this._client = options.client;
    this._settings = options.settings;
    this._isShown = options.isShown;
    this._onDropped = options.onDropped ?? (() => () => undefined);
  }

  /**
   * Defaults for JupyterLab's own per-provider settings: this provider
   * debounces itself (setting `debounceMs`) so it sees every keystroke, fills in
   * the middle of a line because Code Llama can, and allows for a slow first token.
   */
  get schema(): ISettingRegistry.IProperty {
    return {
      default: { debouncerDelay: 0, timeout: 60000, autoFillInMiddle: true }
    };
  }

  async fetch(
    request: CompletionHandler.IRequest,
    context: IInlineCompletionContext
  ): Promise<IInlineCompletionList> {
    const settings = this._settings();
    const invoked =
      context.triggerKind === InlineCompletionTriggerKind.Invoke &&
      !this._invokingAsTyping.has(context.widget.id);
    if (!invoked && settings.trigger === 'manual') {
      // Typing must not wipe what an explicit invoke put on screen.
      throw new KeepCurrentSuggestion('Completions are requested manually');
    }
    const target = completionTarget(context.widget);
    if (!target || !isEnabledFor(settings, target)) {
      return { items: [] };
    }
    const sharedModel = target.editor.model.sharedModel;
    const state = this._stateOf(sharedModel);
    const fetchNumber = ++state.latestFetch;
    if (!invoked && state.suggestion?.isFollowed() && this._isShown(context.widget.id)) {
      throw new KeepCurrentSuggestion('The user is typing along the suggestion');
    }
    const jsOffset = Text.charIndexToJsIndex(request.offset, request.text);
    if (!invoked && editsInsideWord(request.text, jsOffset)) {
      return { items: [] };
    }
    if (!invoked && settings.debounceMs > 0) {
      await new Promise(resolve => setTimeout(resolve, settings.debounceMs));
    }
    if (fetchNumber !== state.latestFetch || sharedModel.getSource() !== request.text) {
      throw new KeepCurrentSuggestion('A newer request replaces this one');
    }
    if (!isStillEdited(target, context.widget)) {
      // JupyterLab would throw the answer away; asking would only delay the next cell's suggestion.
      throw new KeepCurrentSuggestion('The user left the editor this was asked for');
    }
    // The user moved on from the previous suggestion, here or in another editor: stop generating
    // it, as the server runs one generation at a time.
    this._latest?.cancel();

    const suggestion = this._request(request, target, settings, invoked);
    state.suggestion = suggestion;
    this._latest = suggestion;
    stopWhenLeft(suggestion, target.editor);
    // Dismissed on screen (the cursor moved away, a click elsewhere): the server's one worker is wanted
    // for the next request, not for text nobody will see.
    const unwatch = this._onDropped(context.widget.id, () => suggestion.cancel());
    void suggestion.settled().then(unwatch);
    this._remember(context.widget, { suggestion, editor: target.editor });
    // Only the first candidate streams; the others arrive whole at the end. Listed before then,
    // they would cycle through as blanks that Tab accepts as nothing.
    await (suggestion.candidates > 1 ? suggestion.settled() : suggestion.ready());
    if (
      context.triggerKind === InlineCompletionTriggerKind.Invoke &&
      !isStillEdited(target, context.widget)
    ) {
      // JupyterLab checks this for typing, not for an invoke: the ghost text would land in the cell
      // the user moved to, and Tab would insert it at the old cell's position.
      suggestion.cancel();
      throw new KeepCurrentSuggestion('The user left the editor this was asked for');
    }

    if (suggestion.error) {
      // Typing-time failures stay quiet (the status bar shows the state); an explicit request deserves an answer.
      return invoked
        ? { items: [{ insertText: '', error: { message: suggestion.error } }] }
        : { items: [] };
    }
    return { items: this._items(suggestion) };
  }

  async *stream(token: string): AsyncGenerator<{ response: IInlineCompletionItem }> {
    const [id, index] = token.split('/');
    const listed = this._listed.get(id);
    if (!listed) {
      return;
    }
    const { suggestion, invoked } = listed;
    const candidate = Number(index);
    const item = listed.items.get(candidate);
    for await (const text of suggestion.updates(candidate)) {
      if (item) {
        // JupyterLab matches typing against `filterText`, which it fixes at the first keystroke and
        // streaming does not update: typing past that point along the new text would drop the
        // candidate while its ghost text stays on screen, and Tab would accept nothing.
        item.filterText = text;
      }
      yield { response: { insertText: text } };
    }
    if (suggestion.error && invoked) {
      // As in `fetch`: a failure while typing shows in the status bar, not on the ghost text.
      const insertText = suggestion.remaining(candidate) ?? '';
      yield { response: { insertText, error: { message: suggestion.error } } };
    }
  }

  /**
   * Runs `invoke`, which asks JupyterLab's inline completer of this widget, with the request it
   * makes answered as typing (debounced, one candidate, quiet on errors): see blankline.ts.
   * JupyterLab calls `fetch` for an invoke before `invoke` returns.
   */
  invokeAsTyping(widgetId: string, invoke: () => void): void {
    this._invokingAsTyping.add(widgetId);
    try {
      invoke();
    } finally {
      this._invokingAsTyping.delete(widgetId);
    }
  }

  /** The suggestion last requested in the widget with this id, while it may still be on screen. */
  shownIn(widgetId: string): IShownSuggestion | null {
    return this._shown.get(widgetId) ?? null;
  }

  private _remember(widget: Widget, shown: IShownSuggestion): void {
    if (!this._shown.has(widget.id)) {
      widget.disposed.connect(() => this._shown.delete(widget.id));
    }
    this._shown.set(widget.id, shown);
  }

  private _request(
    request: CompletionHandler.IRequest,
    target: NonNullable<ReturnType<typeof completionTarget>>,
    settings: ICompletionSettings,
    invoked: boolean
  ): LiveSuggestion {
    const text = request.text;
    const jsOffset = Text.charIndexToJsIndex(request.offset, text);
    const candidates = invoked ? settings.candidatesOnInvoke : 1;
    const payload = {
      ...target.build(text, jsOffset, request.offset, settings.includeOutputs),
      max_new_tokens: settings.maxNewTokens,
      temperature:
        candidates > 1
          ? Math.max(settings.temperature, MIN_TEMPERATURE_FOR_CANDIDATES)
          : settings.temperature,
      n: candidates,
      mode: settings.multiline
    };
    const sharedModel = target.editor.model.sharedModel;
    const suggestion = new LiveSuggestion({
      client: this._client,
      request: payload,
      snapshot: { before: text.slice(0, jsOffset), after: text.slice(jsOffset) },
      readText: () => sharedModel.getSource(),
      candidates
    });
    const previous = this._stateOf(sharedModel).suggestion;
    if (previous) {
      this._listed.delete(previous.id);
    }
    this._listed.set(suggestion.id, { suggestion, invoked, items: new Map() });
    return suggestion;
  }

  private _items(suggestion: LiveSuggestion): IInlineCompletionItem[] {
    const listed = this._listed.get(suggestion.id);
    const items: IInlineCompletionItem[] = [];
    const seen = new Set<string>();
    for (let i = 0; i < suggestion.candidates; i++) {
      const insertText = suggestion.remaining(i) ?? '';
      if (suggestion.finished) {
        // Finished candidates that are empty or repeated are noise when cycling.
        if (!insertText.trim() || seen.has(insertText)) {
          continue;
        }
        seen.add(insertText);
        items.push({ insertText });
      } else {
        const item = { insertText, isIncomplete: true, token: `${suggestion.id}/${i}` };
        listed?.items.set(i, item);
        items.push(item);
      }
    }
    return items;
  }

  private _stateOf(sharedModel: CodeEditor.IModel['sharedModel']): IEditorState {
    let state = this._editors.get(sharedModel);
    if (!state) {
      const created: IEditorState = { latestFetch: 0, suggestion: null };
      sharedModel.changed.connect(() => created.suggestion?.noteEditorChange());
      this._editors.set(sharedModel, created);
      state = created;
    }
    return state;
  }

  private readonly _client: ICodeLlamaClient;
  private readonly _settings: () => ICompletionSettings;
  private readonly _isShown: (widgetId: string) => boolean;
  private readonly _onDropped: NonNullable<CodeLlamaInlineProvider.IOptions['onDropped']>;
  private readonly _editors = new WeakMap<object, IEditorState>();
  private readonly _listed = new Map<string, IListedSuggestion>();
  private _latest: LiveSuggestion | null = null;
  private readonly _invokingAsTyping = new Set<string>();
  private readonly _shown = new Map<string, IShownSuggestion>();
}

export namespace CodeLlamaInlineProvider {
  export interface IOptions {
    client: ICodeLlamaClient;
    /** Current settings, read at every request so changes apply without a reload. */
    settings: () => ICompletionSettings;
    /** Whether JupyterLab shows ghost text in the widget with this id now. */
    isShown: (widgetId: string) => boolean;
    /**
     * Calls `dropped` whenever the widget with this id stops showing its ghost text; returns what
     * stops the calls.
     */
    onDropped?: (widgetId: string, dropped: () => void) => () => void;
  }
}
