// Plugin that registers the Code Llama inline completion provider and its accept-word/line commands.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICompletionProviderManager } from '@jupyterlab/completer';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
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
  optional: [ISettingRegistry],
  activate: (
    app,
    manager: ICompletionProviderManager,
    client: ICodeLlamaClient,
    registry: ISettingRegistry | null
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
