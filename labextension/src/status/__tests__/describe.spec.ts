// Tests what the status bar item says for each server state.

import { describeStatus } from '../describe';

const model = {
  name: 'CodeLlama-7b',
  supports_infilling: true,
  max_context: 4096,
  device: 'cuda:0',
  dtype: 'bfloat16',
  quant: ''
};

describe('describeStatus', () => {
  it('says connecting before the first answer', () => {
    expect(describeStatus(null, 0).state).toBe('connecting');
  });

  it('names the model while loading', () => {
    expect(describeStatus({ state: 'loading', model, error: null }, 0)).toMatchObject({
      state: 'loading',
      label: 'CodeLlama-7b: loading…'
    });
  });

  it('shows ready with details on hover, and busy while requests run', () => {
    const ready = describeStatus({ state: 'ready', model, error: null }, 0);
    expect(ready).toMatchObject({ state: 'ready', label: 'CodeLlama-7b: ready' });
    expect(ready.title).toContain('cuda:0');
    expect(ready.title).toContain('fill-in-the-middle');
    expect(describeStatus({ state: 'ready', model, error: null }, 2)).toMatchObject({
      state: 'busy',
      label: 'CodeLlama-7b: busy'
    });
  });

  it('says when typing brings no suggestions, rather than ready', () => {
    const off = describeStatus({ state: 'ready', model, error: null }, 0, false);
    expect(off).toMatchObject({ state: 'off', label: 'CodeLlama-7b: completions off' });
    expect(off.title).toContain('switched off');
    expect(describeStatus({ state: 'ready', model, error: null }, 1, false).state).toBe('busy');
  });

  it('says when the last suggestion failed, though the model is ready', () => {
    const failed = describeStatus(
      { state: 'ready', model, error: null },
      0,
      true,
      'the notebook has 2,400,000 characters of text; the limit is 2,000,000'
    );
    expect(failed).toMatchObject({ state: 'failed', label: 'CodeLlama-7b: request failed' });
    expect(failed.title).toContain('the limit is 2,000,000');
  });

  it('says when the weights are held as int8', () => {
    const int8 = describeStatus(
      { state: 'ready', model: { ...model, quant: 'int8' }, error: null },
      0
    );
    expect(int8.title).toContain('int8 weights');
    expect(describeStatus({ state: 'ready', model, error: null }, 0).title).not.toContain(
      'weights'
    );
  });

  it('puts the reason of an error on hover', () => {
    expect(describeStatus({ state: 'error', model: null, error: 'CUDA out of memory' }, 0)).toEqual(
      {
        state: 'error',
        label: 'Code Llama: error',
        title: 'CUDA out of memory'
      }
    );
  });
});
