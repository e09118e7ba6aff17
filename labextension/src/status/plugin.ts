// Plugin for the status bar item showing the model and its state; clicking it opens the Code Llama settings.

import type { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';
import { INLINE_COMPLETER_PLUGIN, inlineProviderSwitches } from '../completions/completer';
import { completionsPlugin } from '../completions/plugin';
import { PROVIDER_ID } from '../completions/provider';
import { readCompletionSettings } from '../completions/settings';
import { CommandIds, ICodeLlamaClient, PLUGIN_PREFIX } from '../tokens';
import { describeStatus } from './describe';

/** A request quicker than this never shows as busy: while typing, each keystroke's would flicker. */
const BUSY_AFTER_MS = 400;
/** Nor does the gap between one request and the next. */
const READY_AFTER_MS = 300;

class ModelStatusItem extends Widget {
  constructor(client: ICodeLlamaClient, onClick: () => void) {
    super();
    this._client = client;
    this.addClass('jp-codellama-StatusItem');
    this.node.setAttribute('role', 'button');
    this.node.addEventListener('click', onClick);
    client.statusChanged.connect(this._render, this);
    client.activityChanged.connect(this._onActivity, this);
    this._render();
  }

  /** Whether typing can bring suggestions; the item says "completions off" when it cannot. */
  showCompletionsOn(value: boolean): void {
    this._completionsOn = value;
    this._render();
  }

  override dispose(): void {
    window.clearTimeout(this._pending);
    super.dispose();
  }

  private _onActivity(): void {
    const busy = this._client.activeRequests > 0;
    window.clearTimeout(this._pending);
    if (busy === this._shownBusy) {
      this._render(); // a request that ended quickly may still have failed (or cleared a failure)
    } else {
      this._pending = window.setTimeout(
        () => {
          this._shownBusy = busy;
          this._render();
        },
        busy ? BUSY_AFTER_MS : READY_AFTER_MS
      );
    }
  }

  private _render(): void {
    const display = describeStatus(
      this._client.status,
      this._shownBusy ? this._client.activeRequests || 1 : 0,
      this._completionsOn,
      this._client.lastFailure
    );
    this.node.textContent = display.label;
    this.node.title = display.title;
    this.node.dataset.state = display.state;
  }

  private readonly _client: ICodeLlamaClient;
  private _shownBusy = false;
  private _completionsOn = true;
  private _pending = 0;
}

/** Follow the two switches that turn suggestions off: ours, and JupyterLab's per-provider one. */
function watchCompletionSwitches(registry: ISettingRegistry, item: ModelStatusItem): void {
  let ours = true;
  let provider = true;
  const update = () => item.showCompletionsOn(ours && provider);
  registry
    .load(completionsPlugin.id)
    .then(settings => {
      const read = () => {
        ours = readCompletionSettings(settings.composite).enabled;
        update();
      };
      read();
      settings.changed.connect(read);
    })
    .catch(() => undefined); // without settings, the defaults: on
  registry
    .load(INLINE_COMPLETER_PLUGIN)
    .then(settings => {
      const read = () => {
        provider = inlineProviderSwitches(settings.composite)[PROVIDER_ID]?.enabled !== false;
        update();
      };
      read();
      settings.changed.connect(read);
    })
    .catch(() => undefined);
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
  optional: [IStatusBar, ISettingRegistry],
  activate: (
    app,
    client: ICodeLlamaClient,
    statusBar: IStatusBar | null,
    registry: ISettingRegistry | null
  ) => {
    addOpenSettingsCommand(app);
    if (!statusBar) {
      return;
    }
    const item = new ModelStatusItem(client, () => {
      void app.commands.execute(CommandIds.openSettings);
    });
    if (registry) {
      watchCompletionSwitches(registry, item);
    }
    statusBar.registerStatusItem(`${PLUGIN_PREFIX}:status`, {
      item,
      align: 'left',
      rank: 4
    });
  }
};
