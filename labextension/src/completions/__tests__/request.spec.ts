// Tests the completion payloads: whole notebook with text-only outputs, and prefix/suffix for files and consoles.

import {
  MAX_OUTPUT_CHARS,
  MAX_OUTPUTS_PER_CELL,
  notebookRequest,
  outputsForContext,
  prefixSuffixRequest
} from '../request';
import {
  DEFAULT_COMPLETION_SETTINGS,
  isEnabledFor,
  languageOfMimeType,
  readCompletionSettings
} from '../settings';

describe('notebookRequest', () => {
  const cells = [
    { cellType: 'markdown', source: '# Title' },
    {
      cellType: 'code',
      source: 'import numpy as np',
      outputs: [
        { output_type: 'stream', name: 'stdout', text: ['a\n', 'b\n'] },
        { output_type: 'display_data', data: { 'image/png': 'AAAA' } },
        { output_type: 'execute_result', data: { 'text/plain': 'array([1])', 'text/html': '<b>' } },
        { output_type: 'error', ename: 'ValueError', evalue: 'bad', traceback: ['...'] }
      ]
    },
    { cellType: 'code', source: 'np.ar', outputs: [] }
  ];

  it('sends every cell, the active index and the offset', () => {
    const request = notebookRequest(cells, 2, 5, true);
    expect(request.cell).toBe(2);
    expect(request.offset).toBe(5);
    expect(request.notebook.cells.map(c => [c.cell_type, c.source])).toEqual([
      ['markdown', '# Title'],
      ['code', 'import numpy as np'],
      ['code', 'np.ar']
    ]);
  });

  it('keeps only textual outputs', () => {
    expect(notebookRequest(cells, 2, 5, true).notebook.cells[1].outputs).toEqual([
      { output_type: 'stream', name: 'stdout', text: 'a\nb\n' },
      { output_type: 'execute_result', data: { 'text/plain': 'array([1])' } },
      { output_type: 'error', ename: 'ValueError', evalue: 'bad' }
    ]);
  });

  it('leaves outputs out when asked to', () => {
    expect(notebookRequest(cells, 2, 5, false).notebook.cells[1].outputs).toBeUndefined();
  });

  it('clips long outputs', () => {
    const [kept] = outputsForContext([
      { output_type: 'stream', name: 'stdout', text: 'x'.repeat(10 * MAX_OUTPUT_CHARS) }
    ]);
    expect((kept as { text: string }).text.length).toBeLessThan(MAX_OUTPUT_CHARS + 10);
  });

  it('never clips inside a surrogate pair', () => {
    const text = `${'x'.repeat(MAX_OUTPUT_CHARS - 1)}\u{1F600}tail`;
    const [kept] = outputsForContext([{ output_type: 'stream', name: 'stdout', text }]);
    expect((kept as { text: string }).text).toBe(`${'x'.repeat(MAX_OUTPUT_CHARS - 1)}\n...`);
  });

  it('sends a bounded number of outputs from a cell that printed thousands', () => {
    const many = Array.from({ length: 5000 }, (_, i) => ({
      output_type: 'display_data',
      data: { 'text/plain': `frame ${i}` }
    }));
    const kept = outputsForContext(many);
    expect(kept).toHaveLength(MAX_OUTPUTS_PER_CELL);
    expect(kept[0]).toEqual({ output_type: 'display_data', data: { 'text/plain': 'frame 0' } });
  });

  it('counts no bare reprs against that bound: the server drops them', () => {
    const plots = Array.from({ length: 12 }, () => ({
      output_type: 'display_data',
      data: { 'text/plain': '<Figure size 640x480 with 1 Axes>' }
    }));
    const traceback = { output_type: 'error', ename: 'ValueError', evalue: 'bad shape' };
    expect(outputsForContext([...plots, traceback])).toEqual([
      { output_type: 'error', ename: 'ValueError', evalue: 'bad shape' }
    ]);
  });
});

describe('prefixSuffixRequest', () => {
  it('splits at the cursor', () => {
    expect(prefixSuffixRequest('abcdef', 3)).toEqual({ prefix: 'abc', suffix: 'def' });
  });

  it('puts console history before the prompt', () => {
    expect(prefixSuffixRequest('y = x', 5, ['x = 1', '  ', 'print(x)'])).toEqual({
      prefix: 'x = 1\n\nprint(x)\n\ny = x',
      suffix: ''
    });
  });
});

describe('completion settings', () => {
  it('falls back to defaults for missing or invalid values', () => {
    expect(readCompletionSettings({})).toEqual(DEFAULT_COMPLETION_SETTINGS);
    const read = readCompletionSettings({
      trigger: 'sometimes',
      debounceMs: -1,
      temperature: 0.7,
      languages: ['Python', 'R']
    });
    expect(read.trigger).toBe('automatic');
    expect(read.debounceMs).toBe(DEFAULT_COMPLETION_SETTINGS.debounceMs);
    expect(read.temperature).toBe(0.7);
    expect(read.languages).toEqual(['python', 'r']);
  });

  it('maps editor MIME types to languages', () => {
    expect(languageOfMimeType('text/x-ipython')).toBe('python');
    expect(languageOfMimeType('text/x-python')).toBe('python');
    expect(languageOfMimeType('text/x-rsrc')).toBe('r');
    expect(languageOfMimeType('text/x-julia')).toBe('julia');
    expect(languageOfMimeType('text/x-ipythongfm')).toBe('markdown');
  });

  it('applies the cell-type and language filters', () => {
    const settings = DEFAULT_COMPLETION_SETTINGS;
    expect(isEnabledFor(settings, { cellType: 'code', language: 'python' })).toBe(true);
    expect(isEnabledFor(settings, { cellType: 'markdown', language: 'markdown' })).toBe(false);
    expect(isEnabledFor(settings, { cellType: null, language: 'julia' })).toBe(false);
    expect(
      isEnabledFor({ ...settings, languages: [] }, { cellType: null, language: 'julia' })
    ).toBe(true);
    expect(
      isEnabledFor(
        { ...settings, cellTypes: ['code', 'markdown'] },
        { cellType: 'markdown', language: 'markdown' }
      )
    ).toBe(true);
    expect(
      isEnabledFor({ ...settings, enabled: false }, { cellType: 'code', language: 'python' })
    ).toBe(false);
  });

  it('completes raw cells when enabled for them, although their editor language is plain text', () => {
    const settings = DEFAULT_COMPLETION_SETTINGS;
    const raw = { cellType: 'raw', language: 'plain' };
    expect(isEnabledFor(settings, raw)).toBe(false);
    expect(isEnabledFor({ ...settings, cellTypes: ['code', 'raw'] }, raw)).toBe(true);
  });
});
