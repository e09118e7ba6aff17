// Plugin that provides the tab's single Code Llama client to every feature.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import { CodeLlamaClient } from './client';

export const clientPlugin: JupyterFrontEndPlugin<ICodeLlamaClient> = {
  id: `${PLUGIN_PREFIX}:client`,
  description: 'Connects this browser tab to the Code Llama server.',
  autoStart: true,
  provides: ICodeLlamaClient,
  activate: app => new CodeLlamaClient({ serverSettings: app.serviceManager.serverSettings })
};
