// Plugin that registers the Code Llama inline completion provider and its accept-word/line commands.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { EditorExtensionRegistry, IEditorExtensionRegistry } from '@jupyterlab/codemirror';
import { ICompletionProviderManager } from '@jupyterlab/completer';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import { blankLineTrigger } from './blankline';
import { addPartialAcceptCommands } from './commands';
import { CodeLlamaInlineProvider } from './provider';
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
      isShown: widgetId => manager.inline?.isActive(widgetId) ?? false
    });
    // Registered during activation: JupyterLab builds the inline-completer settings from providers known once the app is restored.
    manager.registerInlineProvider(provider);
    addPartialAcceptCommands(app, manager, provider);

    // JupyterLab asks inline providers only at the end of a line with text; on the blank line that
    // Enter opens we ask ourselves, as an invoke the provider answers like typing.
    const askOnBlankLine = (text: string) => {
      const widget = app.shell.currentWidget;
      const inline = manager.inline;
      if (!widget || !inline || !settings.enabled || settings.trigger !== 'automatic') {
        return;
      }
      // After JupyterLab's handler has seen the same keystroke: its own (skipped) request would
      // otherwise make this one look out of date.
      setTimeout(() => {
        provider.expectAutomaticInvoke(widget.id, text);
        inline.invoke(widget.id);
      }, 0);
    };
    editorExtensions?.addExtension({
      name: `${PLUGIN_PREFIX}:blank-line-suggestions`,
      factory: () =>
        EditorExtensionRegistry.createImmutableExtension(blankLineTrigger(askOnBlankLine))
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
