// TypeScript mirror of the /codellama REST and websocket protocol, and the one place that validates what the server sends.

/** What the model service reports about itself (`GET /codellama/status`). */
export interface IServerStatus {
  state: 'loading' | 'ready' | 'error';
  model: IModelInfo | null;
  error: string | null;
}

export interface IModelInfo {
  name: string;
  supports_infilling: boolean;
  max_context: number;
  device: string;
  dtype: string;
  /** 'int8' when the matrices are held as int8; '' when in the model's dtype. */
  quant: string;
}

/** The cell fields the server's context builder reads; outputs keep only their text. */
export interface INotebookCellPayload {
  cell_type: string;
  source: string;
  outputs?: IOutputPayload[];
}

export type IOutputPayload =
  | { output_type: 'stream'; name: string; text: string }
  | {
      output_type: 'execute_result' | 'display_data';
      data: { 'text/plain': string };
    }
  | { output_type: 'error'; ename: string; evalue: string };

export type MultilineMode = 'line' | 'block' | 'auto' | 'none';

export interface IGenerationOptions {
  max_new_tokens?: number;
  temperature?: number;
  n?: number;
  mode?: MultilineMode;
  stop?: string[];
}

export interface IPrefixSuffixRequest extends IGenerationOptions {
  prefix: string;
  suffix: string;
}

export interface INotebookRequest extends IGenerationOptions {
  notebook: { cells: INotebookCellPayload[] };
  cell: number;
  /** Unicode code points into the cell's source, as Python counts characters. */
  offset: number;
}

export type ICompletionRequest = IPrefixSuffixRequest | INotebookRequest;

export interface ICompletionResult {
  text: string;
  choices: string[];
  usage: Record<string, unknown>;
  timings: Record<string, unknown>;
}

export interface IChunkMessage {
  type: 'chunk';
  id: string;
  text: string;
}

export interface IDoneMessage extends ICompletionResult {
  type: 'done';
  id: string;
  cancelled?: boolean;
}

export interface IErrorMessage {
  type: 'error';
  id: string;
  message: string;
}

export type ServerMessage = IChunkMessage | IDoneMessage | IErrorMessage;

export type ClientMessage =
  ({ type: 'complete'; id: string } & ICompletionRequest) | { type: 'cancel'; id: string };

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function stringList(value: unknown): string[] {
  return Array.isArray(value)
    ? value.filter((item): item is string => typeof item === 'string')
    : [];
}

/**
 * Parse one websocket frame. Returns null for anything that is not a message
 * this client understands, so a newer server cannot crash an older page.
 */
export function parseServerMessage(raw: unknown): ServerMessage | null {
  let data: unknown;
  try {
    data = typeof raw === 'string' ? JSON.parse(raw) : raw;
  } catch {
    return null;
  }
  if (!isRecord(data) || typeof data.id !== 'string') {
    return null;
  }
  const id = data.id;
  switch (data.type) {
    case 'chunk':
      return typeof data.text === 'string' ? { type: 'chunk', id, text: data.text } : null;
    case 'done': {
      const text = typeof data.text === 'string' ? data.text : '';
      const choices = stringList(data.choices);
      return {
        type: 'done',
        id,
        text,
        choices: choices.length > 0 ? choices : [text],
        usage: isRecord(data.usage) ? data.usage : {},
        timings: isRecord(data.timings) ? data.timings : {},
        ...(data.cancelled === true ? { cancelled: true } : {})
      };
    }
    case 'error':
      return {
        type: 'error',
        id,
        message: typeof data.message === 'string' ? data.message : 'Unknown error'
      };
    default:
      return null;
  }
}

/** Validate `GET /codellama/status`; a malformed answer reads as an error state rather than throwing. */
export function parseServerStatus(data: unknown): IServerStatus {
  if (!isRecord(data)) {
    return { state: 'error', model: null, error: 'Malformed status reply' };
  }
  const state = data.state === 'loading' || data.state === 'ready' ? data.state : 'error';
  const model = isRecord(data.model)
    ? {
        name: typeof data.model.name === 'string' ? data.model.name : '',
        supports_infilling: data.model.supports_infilling === true,
        max_context: typeof data.model.max_context === 'number' ? data.model.max_context : 0,
        device: typeof data.model.device === 'string' ? data.model.device : '',
        dtype: typeof data.model.dtype === 'string' ? data.model.dtype : '',
        quant: typeof data.model.quant === 'string' ? data.model.quant : ''
      }
    : null;
  const error =
    typeof data.error === 'string'
      ? data.error
      : state === 'error' && data.state !== 'error'
        ? `Unknown state ${JSON.stringify(data.state)}`
        : null;
  return { state, model, error };
}
