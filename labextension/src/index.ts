// Entry point of the Code Llama JupyterLab extension: the plugins JupyterLab loads, one per feature.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';
import { clientPlugin } from './client/plugin';
import { completionsPlugin } from './completions/plugin';
import { docstringPlugin } from './docstring/plugin';
import { magicPlugin } from './magic/plugin';
import { statusPlugin } from './status/plugin';

export * from './tokens';
export type { IServerStatus, ICompletionRequest, ICompletionResult } from './client/protocol';

const plugins: JupyterFrontEndPlugin<any>[] = [
  clientPlugin,
  completionsPlugin,
  docstringPlugin,
  magicPlugin,
  statusPlugin
];

export default plugins;
