// Completion settings as the provider uses them, read defensively from the settings registry (schema/completions.json).

import type { MultilineMode } from '../client/protocol';

export interface ICompletionSettings {
  enabled: boolean;
  /** `manual` completes only on explicit invoke (Alt+\). */
  trigger: 'automatic' | 'manual';
  debounceMs: number;
  maxNewTokens: number;
  temperature: number;
  multiline: Exclude<MultilineMode, 'none'>;
  candidatesOnInvoke: number;
  cellTypes: string[];
  /** Empty means every language. */
  languages: string[];
  includeOutputs: boolean;
}

export const DEFAULT_COMPLETION_SETTINGS: ICompletionSettings = {
  enabled: true,
  trigger: 'automatic',
  debounceMs: 300,
  maxNewTokens: 64,
  temperature: 0.2,
  multiline: 'auto',
  candidatesOnInvoke: 3,
  cellTypes: ['code'],
  languages: ['python'],
  includeOutputs: true
};

/** Candidates sampled at a near-zero temperature would all be the same text. */
export const MIN_TEMPERATURE_FOR_CANDIDATES = 0.6;

function pick<T>(value: unknown, isValid: (v: unknown) => v is T, fallback: T): T {
  return isValid(value) ? value : fallback;
}

const isBoolean = (v: unknown): v is boolean => typeof v === 'boolean';
const isNumberAtLeast =
  (min: number) =>
  (v: unknown): v is number =>
    typeof v === 'number' && Number.isFinite(v) && v >= min;
const isOneOf =
  <T extends string>(...options: T[]) =>
  (v: unknown): v is T =>
    typeof v === 'string' && (options as string[]).includes(v);
const isStringList = (v: unknown): v is string[] =>
  Array.isArray(v) && v.every(item => typeof item === 'string');

export function readCompletionSettings(
  composite: Readonly<Record<string, unknown>>
): ICompletionSettings {
  const d = DEFAULT_COMPLETION_SETTINGS;
  return {
    enabled: pick(composite.enabled, isBoolean, d.enabled),
    trigger: pick(composite.trigger, isOneOf('automatic', 'manual'), d.trigger),
    debounceMs: pick(composite.debounceMs, isNumberAtLeast(0), d.debounceMs),
    maxNewTokens: pick(composite.maxNewTokens, isNumberAtLeast(1), d.maxNewTokens),
    temperature: pick(composite.temperature, isNumberAtLeast(0), d.temperature),
    multiline: pick(composite.multiline, isOneOf('line', 'block', 'auto'), d.multiline),
    candidatesOnInvoke: Math.floor(
      pick(composite.candidatesOnInvoke, isNumberAtLeast(1), d.candidatesOnInvoke)
    ),
    cellTypes: pick(composite.cellTypes, isStringList, d.cellTypes),
    languages: pick(composite.languages, isStringList, d.languages).map(l => l.toLowerCase()),
    includeOutputs: pick(composite.includeOutputs, isBoolean, d.includeOutputs)
  };
}

/**
 * Language of an editor from its MIME type: `text/x-ipython` and `text/x-python`
 * are python, `text/x-rsrc` is r, otherwise the subtype without its `x-`.
 */
export function languageOfMimeType(mimeType: string): string {
  const subtype = (mimeType.split('/')[1] ?? mimeType).toLowerCase();
  const name = subtype.replace(/^x-/, '');
  const aliases: Record<string, string> = {
    ipython: 'python',
    python3: 'python',
    rsrc: 'r',
    'c++src': 'c++',
    csrc: 'c',
    sh: 'bash',
    ipythongfm: 'markdown',
    gfm: 'markdown'
  };
  return aliases[name] ?? name;
}

export function isEnabledFor(
  settings: ICompletionSettings,
  where: { cellType: string | null; language: string }
): boolean {
  if (!settings.enabled) {
    return false;
  }
  if (where.cellType !== null && !settings.cellTypes.includes(where.cellType)) {
    return false;
  }
  // Markdown and raw cells are not written in the kernel's language.
  if (where.cellType === 'markdown' || where.cellType === 'raw') {
    return true;
  }
  return (
    settings.languages.length === 0 || settings.languages.includes(where.language.toLowerCase())
  );
}
