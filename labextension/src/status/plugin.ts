// Plugin for the status bar item showing the model and its state; clicking it opens the Code Llama settings.

import type { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';
import { CommandIds, ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import { describeStatus } from './describe';

class ModelStatusItem extends Widget {
  constructor(client: ICodeLlamaClient, onClick: () => void) {
    super();
    this._client = client;
    this.addClass('jp-codellama-StatusItem');
    this.node.setAttribute('role', 'button');
    this.node.addEventListener('click', onClick);
    client.statusChanged.connect(this._render, this);
    client.activityChanged.connect(this._render, this);
    this._render();
  }

  private _render(): void {
    const display = describeStatus(this._client.status, this._client.activeRequests);
    this.node.textContent = display.label;
    this.node.title = display.title;
    this.node.dataset.state = display.state;
  }

  private readonly _client: ICodeLlamaClient;
}

function addOpenSettingsCommand(app: JupyterFrontEnd): void {
  app.commands.addCommand(CommandIds.openSettings, {
    label: 'Code Llama Settings',
    execute: () => app.commands.execute('settingeditor:open', { query: 'Code Llama' })
  });
}

export const statusPlugin: JupyterFrontEndPlugin<void> = {
  id: `${PLUGIN_PREFIX}:status`,
  description: 'Shows the Code Llama model and its state in the status bar.',
  autoStart: true,
  requires: [ICodeLlamaClient],
  optional: [IStatusBar],
  activate: (app, client: ICodeLlamaClient, statusBar: IStatusBar | null) => {
    addOpenSettingsCommand(app);
    if (!statusBar) {
      return;
    }
    const item = new ModelStatusItem(client, () => {
      void app.commands.execute(CommandIds.openSettings);
    });
    statusBar.registerStatusItem(`${PLUGIN_PREFIX}:status`, {
      item,
      align: 'left',
      rank: 4
    });
  }
};
