// Plugin that registers the Code Llama inline completion provider and its accept-word/line commands.

import type { EditorView } from '@codemirror/view';
import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { EditorExtensionRegistry, IEditorExtensionRegistry } from '@jupyterlab/codemirror';
import { ICompletionProviderManager } from '@jupyterlab/completer';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import { blankLineTrigger } from './blankline';
import { addPartialAcceptCommands } from './commands';
import {
  INLINE_COMPLETER_PLUGIN,
  inlineProviderSwitches,
  InlineProviderSwitches,
  onSuggestionDropped,
  showsSuggestion
} from './completer';
import { CodeLlamaInlineProvider, PROVIDER_ID } from './provider';
import {
  DEFAULT_COMPLETION_SETTINGS,
  ICompletionSettings,
  readCompletionSettings
} from './settings';

export const completionsPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:completions`,
  description: 'Streams Code Llama suggestions into JupyterLab ghost text.',
  autoStart: true,
  requires: [ICompletionProviderManager, ICodeLlamaClient],
  optional: [ISettingRegistry, IEditorExtensionRegistry],
  activate: (
    app,
    manager: ICompletionProviderManager,
    client: ICodeLlamaClient,
    registry: ISettingRegistry | null,
    editorExtensions: IEditorExtensionRegistry | null
  ) => {
    let settings: ICompletionSettings = DEFAULT_COMPLETION_SETTINGS;
    const provider = new CodeLlamaInlineProvider({
      client,
      settings: () => settings,
      isShown: widgetId => showsSuggestion(manager, widgetId),
      onDropped: (widgetId, dropped) => onSuggestionDropped(manager, widgetId, dropped)
    });
    // Registered during activation: JupyterLab builds the inline-completer settings from providers known once the app is restored.
    manager.registerInlineProvider(provider);

    // JupyterLab asks inline providers only at the end of a line with text; on the blank line that
    // Enter opens we ask ourselves, as an invoke the provider answers like typing. An invoke asks
    // every enabled inline provider, so only while ours is the one enabled.
    let inlineProviders: InlineProviderSwitches = {};
    const onlyOursEnabled = () =>
      inlineProviders[PROVIDER_ID]?.enabled !== false &&
      !Object.entries(inlineProviders).some(([id, p]) => id !== PROVIDER_ID && p?.enabled === true);
    /** An invoke answered as typing, in the widget shown now. Not if another provider would answer too. */
    const askAsTyping = (widgetId: string) => {
      const inline = manager.inline;
      if (inline && onlyOursEnabled() && app.shell.currentWidget?.id === widgetId) {
        provider.invokeAsTyping(widgetId, () => inline.invoke(widgetId));
      }
    };
    addPartialAcceptCommands(app, manager, provider, askAsTyping);
    const askOnBlankLine = (view: EditorView) => {
      const widget = app.shell.currentWidget;
      const inline = manager.inline;
      // Not for an editor outside the document (the metadata editor); the provider's fetch applies
      // the rest of the settings (trigger, cell types, languages) as it does for typing.
      if (!widget || !inline || !onlyOursEnabled() || !widget.node.contains(view.dom)) {
        return;
      }
      const text = view.state.doc.toString();
      // After JupyterLab's handler has seen the same keystroke: its own (skipped) request would
      // otherwise make this one look out of date. Not if the user typed on meanwhile.
      setTimeout(() => {
        if (view.hasFocus && view.state.doc.toString() === text) {
          askAsTyping(widget.id);
        }
      }, 0);
    };
    editorExtensions?.addExtension({
      name: `${PLUGIN_PREFIX}:blank-line-suggestions`,
      factory: () =>
        EditorExtensionRegistry.createImmutableExtension(blankLineTrigger(askOnBlankLine))
    });

    registry
      ?.load(INLINE_COMPLETER_PLUGIN)
      .then(loaded => {
        const apply = () => {
          inlineProviders = inlineProviderSwitches(loaded.composite);
        };
        apply();
        loaded.changed.connect(apply);
      })
      .catch(() => {
        // Without JupyterLab's inline completer settings, assume ours is the provider in use.
      });
    registry
      ?.load(completionsPlugin.id)
      .then(loaded => {
        const apply = () => {
          settings = readCompletionSettings(loaded.composite);
        };
        apply();
        loaded.changed.connect(apply);
      })
      .catch(reason => {
        console.warn('Code Llama: completion settings unavailable, using defaults', reason);
      });
  }
};
