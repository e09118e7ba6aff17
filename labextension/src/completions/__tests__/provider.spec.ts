// Tests the provider's request policy: debounce, superseding, keeping a followed suggestion, manual trigger, errors.

import { Signal } from '@lumino/signaling';
import type { ICompletionRequest, IDoneMessage } from '../../client/protocol';
import type { ICodeLlamaClient, ICompletionStream } from '../../tokens';
import { CodeLlamaInlineProvider } from '../provider';
import { DEFAULT_COMPLETION_SETTINGS, ICompletionSettings } from '../settings';
import { completionTarget } from '../target';

jest.mock('@jupyterlab/completer', () => ({
  InlineCompletionTriggerKind: { Invoke: 0, Automatic: 1 }
}));
jest.mock('../target', () => ({ completionTarget: jest.fn() }));

const INVOKE = 0;
const AUTOMATIC = 1;

class FakeEditorModel {
  text = '';
  changed = new Signal<this, void>(this);
  getSource = () => this.text;
  type(text: string): void {
    this.text += text;
    this.changed.emit();
  }
}

interface IFakeRequest {
  request: ICompletionRequest;
  chunk(text: string): void;
  done(text: string, choices?: string[]): void;
  fail(message: string): void;
  cancelled: boolean;
}

function fakeClient() {
  const requests: IFakeRequest[] = [];
  const client = {
    stream(
      request: ICompletionRequest,
      onChunk?: (delta: string, soFar: string) => void
    ): ICompletionStream {
      let soFar = '';
      let resolve!: (m: IDoneMessage) => void;
      let reject!: (e: Error) => void;
      const done = new Promise<IDoneMessage>((res, rej) => ((resolve = res), (reject = rej)));
      const id = `req-${requests.length + 1}`;
      const fake: IFakeRequest = {
        request,
        cancelled: false,
        chunk: text => onChunk?.(text, (soFar += text)),
        done: (text, choices = [text]) =>
          resolve({ type: 'done', id, text, choices, usage: {}, timings: {} }),
        fail: message => reject(new Error(message))
      };
      requests.push(fake);
      return { id, done, cancel: () => (fake.cancelled = true) };
    }
  } as unknown as ICodeLlamaClient;
  return { client, requests };
}

function fakeEditor(text: string) {
  const editorModel = new FakeEditorModel();
  editorModel.text = text;
  const editor = {
    model: { sharedModel: editorModel },
    focused: true,
    hasFocus: () => editor.focused
  };
  const target = {
    editor,
    cellType: 'code',
    language: 'python',
    build: (source: string, jsOffset: number) => ({
      prefix: source.slice(0, jsOffset),
      suffix: source.slice(jsOffset)
    })
  };
  return { editorModel, editor, target };
}

function setup(overrides: Partial<ICompletionSettings> = {}, shown = true) {
  const { editorModel, editor, target } = fakeEditor('x = ');
  (completionTarget as jest.Mock).mockReturnValue(target);
  const { client, requests } = fakeClient();
  const settings = { ...DEFAULT_COMPLETION_SETTINGS, debounceMs: 20, ...overrides };
  /** JupyterLab's inline completer drops its ghost text (Escape, a cursor move). */
  const dropped = new Signal<unknown, string>({});
  const provider = new CodeLlamaInlineProvider({
    client,
    settings: () => settings,
    isShown: () => shown,
    onDropped: (widgetId, onDrop) => {
      const slot = (_: unknown, id: string) => id === widgetId && onDrop();
      dropped.connect(slot);
      return () => dropped.disconnect(slot);
    }
  });
  const widget: any = { id: 'nb-1' };
  widget.disposed = new Signal(widget);
  const fetchFrom =
    (model: FakeEditorModel) =>
    (triggerKind: number, offset = model.text.length) =>
      provider.fetch({ text: model.text, offset, mimeType: 'text/x-ipython' }, {
        widget,
        triggerKind
      } as any);
  /** The user leaves the editor for another one (a cell below) of the same widget. */
  const moveToAnotherEditor = () => {
    editor.focused = false;
    const other = fakeEditor('y = ');
    (completionTarget as jest.Mock).mockReturnValue(other.target);
    return fetchFrom(other.editorModel);
  };
  const fetch = fetchFrom(editorModel);
  const drop = (widgetId = widget.id) => dropped.emit(widgetId);
  return { provider, requests, editorModel, editor, fetch, moveToAnotherEditor, drop };
}

const tick = (ms = 0) => new Promise(resolve => setTimeout(resolve, ms));

describe('CodeLlamaInlineProvider', () => {
  it('debounces typing: only the last of quick fetches reaches the server', async () => {
    const { requests, editorModel, fetch } = setup();
    const first = fetch(AUTOMATIC);
    editorModel.type('1');
    const second = fetch(AUTOMATIC);
    await expect(first).rejects.toThrow(/newer request/);
    await tick(30);
    expect(requests).toHaveLength(1);
    expect(requests[0].request).toMatchObject({
      prefix: 'x = 1',
      suffix: '',
      n: 1,
      max_new_tokens: 64,
      mode: 'auto'
    });
    requests[0].chunk('+ 2');
    await expect(second).resolves.toEqual({
      items: [{ insertText: '+ 2', isIncomplete: true, token: 'req-1/0' }]
    });
  });

  it('streams the rest of the suggestion through the token', async () => {
    const { provider, requests, fetch } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('a');
    const { items } = await listed;
    const texts: string[] = [];
    const streaming = (async () => {
      for await (const { response } of provider.stream(items[0].token!)) {
        texts.push(response.insertText);
      }
    })();
    await tick();
    requests[0].chunk('bc');
    await tick();
    requests[0].done('abc');
    await streaming;
    expect(texts).toEqual(['a', 'abc']);
  });

  it('keeps the listed item matching what streams, so JupyterLab keeps it while the user types along', async () => {
    const { provider, requests, fetch } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('ra');
    const [item] = (await listed).items;
    item.filterText = 'ra'; // what JupyterLab records at the user's first keystroke
    const streaming = (async () => {
      for await (const { response } of provider.stream(item.token!)) {
        item.insertText = response.insertText; // as JupyterLab's reconciliator does
      }
    })();
    await tick();
    requests[0].chunk('nge(10)');
    await tick();
    expect(item.filterText).toBe('range(10)');
    requests[0].done('range(10)');
    await streaming;
  });

  it('keeps a failure while typing off the ghost text, as fetch does', async () => {
    const { provider, requests, fetch } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('a');
    const [item] = (await listed).items;
    const responses: { error?: unknown }[] = [];
    const streaming = (async () => {
      for await (const { response } of provider.stream(item.token!)) {
        responses.push(response);
      }
    })();
    await tick();
    requests[0].fail('connection lost');
    await streaming;
    expect(responses.every(response => response.error === undefined)).toBe(true);
  });

  it('asks nothing for an editor the user left during the debounce', async () => {
    const { requests, editor, fetch } = setup();
    const listed = fetch(AUTOMATIC);
    editor.focused = false;
    await expect(listed).rejects.toThrow(/left the editor/);
    expect(requests).toHaveLength(0);
  });

  it('stops the suggestion of the editor the user left once another editor asks', async () => {
    const { requests, fetch, moveToAnotherEditor } = setup();
    const first = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('foo');
    await first;
    const fetchThere = moveToAnotherEditor();
    void fetchThere(AUTOMATIC);
    await tick(30);
    expect(requests).toHaveLength(2);
    expect(requests[1].request).toMatchObject({ prefix: 'y = ' });
    expect(requests[0].cancelled).toBe(true);
  });

  it('stops generating once the editor loses the focus, but not for the completer toolbar', async () => {
    const { requests, editor, fetch } = setup();
    const host = new EventTarget() as EventTarget & { contains: (node: unknown) => boolean };
    host.contains = () => false;
    (editor as unknown as { host: typeof host }).host = host;
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('foo');
    await listed;
    const blur = (relatedTarget: unknown) =>
      host.dispatchEvent(Object.assign(new Event('focusout'), { relatedTarget }));
    blur({ closest: (selector: string) => (selector === '.jp-InlineCompleter' ? {} : null) });
    expect(requests[0].cancelled).toBe(false);
    blur(null); // another cell, another window
    expect(requests[0].cancelled).toBe(true);
  });

  it('stops generating once its ghost text is dismissed, and only its own widget counts', async () => {
    const { requests, fetch, drop } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('foo');
    await listed;
    drop('another-notebook');
    expect(requests[0].cancelled).toBe(false);
    drop(); // the cursor moved to another line
    expect(requests[0].cancelled).toBe(true);
  });

  it('stops watching for dismissal once generation has ended', async () => {
    const { requests, fetch, drop } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].done('foo');
    await listed;
    await tick();
    drop(); // accepting a whole suggestion clears it too: nothing is left to stop
    expect(requests[0].cancelled).toBe(false);
  });

  it('keeps a suggestion the user is typing along instead of asking again', async () => {
    const { requests, editorModel, fetch } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('foo(1)');
    await listed;
    editorModel.type('fo');
    await expect(fetch(AUTOMATIC)).rejects.toThrow(/typing along/);
    expect(requests).toHaveLength(1);
    expect(requests[0].cancelled).toBe(false);
  });

  it('cancels the old suggestion and asks again once the user typed past it', async () => {
    const { requests, editorModel, fetch } = setup();
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('foo(1)');
    await listed;
    editorModel.type('z');
    expect(requests[0].cancelled).toBe(true); // at the keystroke, before any new fetch
    void fetch(AUTOMATIC);
    await tick(30);
    expect(requests).toHaveLength(2);
  });

  it('asks again when the ghost text is no longer shown, even if the text still matches', async () => {
    const { requests, fetch } = setup({}, false);
    const listed = fetch(AUTOMATIC);
    await tick(30);
    requests[0].chunk('foo');
    await listed;
    void fetch(AUTOMATIC);
    await tick(30);
    expect(requests).toHaveLength(2);
    expect(requests[0].cancelled).toBe(true);
  });

  it('asks for several candidates at once on invoke, without debounce, sampling warmer', async () => {
    const { requests, fetch } = setup({ candidatesOnInvoke: 3, temperature: 0 });
    const listed = fetch(INVOKE);
    await tick();
    expect(requests[0].request).toMatchObject({ n: 3, temperature: 0.6 });
    requests[0].chunk('a');
    let listedYet = false;
    void listed.then(() => (listedYet = true));
    await tick();
    expect(listedYet).toBe(false); // the other candidates come only with the end: no blanks to cycle
    requests[0].done('a', ['a', 'b', 'a']);
    expect((await listed).items.map(i => i.insertText)).toEqual(['a', 'b']);
  });

  it('in manual mode ignores typing without clearing what is shown', async () => {
    const { requests, fetch } = setup({ trigger: 'manual' });
    await expect(fetch(AUTOMATIC)).rejects.toThrow(/manually/);
    expect(requests).toHaveLength(0);
  });

  it('stays quiet while the user edits inside a word, unless asked', async () => {
    const { requests, editorModel, fetch } = setup();
    editorModel.text = 'x = valus + 1';
    await expect(fetch(AUTOMATIC, 'x = valu'.length)).resolves.toEqual({ items: [] });
    await tick(30);
    expect(requests).toHaveLength(0);
    void fetch(INVOKE, 'x = valu'.length);
    await tick();
    expect(requests[0].request).toMatchObject({ prefix: 'x = valu', suffix: 's + 1' });
  });

  it('keeps an invoked suggestion the user types along, even in front of a word', async () => {
    const { requests, editorModel, fetch } = setup({ candidatesOnInvoke: 1 });
    editorModel.text = 'x = values';
    const listed = fetch(INVOKE, 'x = '.length);
    await tick();
    requests[0].chunk('sum(');
    await listed;
    editorModel.text = 'x = svalues';
    editorModel.changed.emit();
    await expect(fetch(AUTOMATIC, 'x = s'.length)).rejects.toThrow(/typing along/);
  });

  it('answers an invoke made for typing onto a blank line as typing: debounced, one candidate', async () => {
    const { provider, requests, editorModel, fetch } = setup({ candidatesOnInvoke: 3 });
    editorModel.text = 'def f(x):\n    ';
    let listed!: ReturnType<typeof fetch>;
    provider.invokeAsTyping('nb-1', () => {
      listed = fetch(INVOKE);
    });
    await tick();
    expect(requests).toHaveLength(0); // still in the debounce
    await tick(30);
    expect(requests[0].request).toMatchObject({ n: 1 });
    requests[0].fail('model is loading');
    await expect(listed).resolves.toEqual({ items: [] }); // quiet, as for typing
    // Only that invoke: the user's own Alt+\\ afterwards asks for candidates.
    void fetch(INVOKE);
    await tick();
    expect(requests[1].request).toMatchObject({ n: 3 });
  });

  it('drops an invoked suggestion once the user has left its editor', async () => {
    const { requests, editor, fetch } = setup({ candidatesOnInvoke: 1 });
    const listed = fetch(INVOKE);
    await tick();
    editor.focused = false; // moved to another cell before the first token
    requests[0].chunk('total');
    await expect(listed).rejects.toThrow(/left the editor/);
    expect(requests[0].cancelled).toBe(true);
  });

  it('returns nothing where completions are switched off', async () => {
    const { requests, fetch } = setup({ languages: ['r'] });
    await expect(fetch(INVOKE)).resolves.toEqual({ items: [] });
    expect(requests).toHaveLength(0);
  });

  it('answers an explicit invoke that failed with the error, and typing with nothing', async () => {
    const invoked = setup();
    const listed = invoked.fetch(INVOKE);
    await tick();
    invoked.requests[0].fail('model is loading');
    expect((await listed).items[0].error).toEqual({ message: 'model is loading' });

    const typed = setup();
    const quiet = typed.fetch(AUTOMATIC);
    await tick(30);
    typed.requests[0].fail('model is loading');
    await expect(quiet).resolves.toEqual({ items: [] });
  });
});
