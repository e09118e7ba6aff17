// What the status bar item says about the model, derived from the server's status and the requests in flight.

import type { IServerStatus } from '../client/protocol';

export type DisplayState = 'connecting' | 'loading' | 'ready' | 'busy' | 'off' | 'failed' | 'error';

export interface IStatusDisplay {
  state: DisplayState;
  label: string;
  /** Hover text: details when things work, the reason when they do not. */
  title: string;
}

/**
 * `completionsOn`: whether typing can bring suggestions (the extension's setting and JupyterLab's
 * inline-completer provider switch); when not, the item says so rather than "ready".
 */
export function describeStatus(
  status: IServerStatus | null,
  activeRequests: number,
  completionsOn = true,
  lastFailure: string | null = null
): IStatusDisplay {
  if (!status) {
    return {
      state: 'connecting',
      label: 'Code Llama: connecting…',
      title: 'Waiting for the Code Llama server to answer'
    };
  }
  const name = status.model?.name || 'Code Llama';
  if (status.state === 'error') {
    return {
      state: 'error',
      label: `${name}: error`,
      title: status.error ?? 'The Code Llama server reported an error'
    };
  }
  if (status.state === 'loading') {
    return {
      state: 'loading',
      label: `${name}: loading…`,
      title: `Loading ${name}; completions start when it is ready`
    };
  }
  const model = status.model;
  const details = model
    ? [
        model.device && `device ${model.device}`,
        model.dtype && `dtype ${model.dtype}`,
        model.quant && `${model.quant} weights`,
        model.max_context > 0 && `context ${model.max_context} tokens`,
        model.supports_infilling ? 'fill-in-the-middle' : 'prefix-only (no infilling)'
      ]
        .filter(Boolean)
        .join(', ')
    : '';
  const busy = activeRequests > 0;
  if (!busy && lastFailure && completionsOn) {
    return {
      state: 'failed',
      label: `${name}: request failed`,
      title: `The last suggestion failed: ${lastFailure}. The next one that succeeds clears this.`
    };
  }
  const state: DisplayState = busy ? 'busy' : completionsOn ? 'ready' : 'off';
  const off = completionsOn
    ? ''
    : ' Completions are switched off (Settings → Code Llama completions, or the inline completer settings).';
  return {
    state,
    label: `${name}: ${state === 'off' ? 'completions off' : state}`,
    title: `${name}${details ? ` (${details})` : ''}.${off} Click to open the Code Llama settings.`
  };
}
