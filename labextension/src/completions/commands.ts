// Accept-next-word and accept-next-line for ghost text, built as programmatic typing so JupyterLab trims the ghost itself.

import type { JupyterFrontEnd } from '@jupyterlab/application';
import { CommandRegistry } from '@lumino/commands';
import type { CodeEditor } from '@jupyterlab/codeeditor';
import type { ICompletionProviderManager } from '@jupyterlab/completer';
import { CommandIds } from '../tokens';
import { completerOf } from './completer';
import { nextLine, nextWord } from './partial';
import type { CodeLlamaInlineProvider } from './provider';

/** JupyterLab's accept-all command; accepting everything leaves nothing worth generating. */
const ACCEPT_ALL = 'inline-completer:accept';

interface IGhost {
  text: string;
  editor: CodeEditor.IEditor;
}

function shownGhost(
  manager: ICompletionProviderManager,
  provider: CodeLlamaInlineProvider,
  widgetId: string
): IGhost | null {
  if (!manager.inline?.isActive(widgetId)) {
    return null;
  }
  const completer = completerOf(manager, widgetId);
  if (completer?.current && completer.editor) {
    return { text: completer.current.insertText, editor: completer.editor };
  }
  // Without the handler, fall back to this provider's first candidate.
  const shown = provider.shownIn(widgetId);
  const text = shown?.suggestion.remaining(0);
  return shown && text ? { text, editor: shown.editor } : null;
}

function typeIntoEditor(editor: CodeEditor.IEditor, text: string): void {
  if (editor.replaceSelection) {
    editor.replaceSelection(text);
    return;
  }
  const offset = editor.getOffsetAt(editor.getCursorPosition());
  editor.model.sharedModel.updateSource(offset, offset, text);
  editor.setCursorPosition(editor.getPositionAt(offset + text.length)!);
}

/**
 * `askAgain(widgetId)` asks for a suggestion as typing would; called after Tab accepted a suggestion
 * that was still streaming, whose rest the accept threw away with JupyterLab's candidates.
 */
export function addPartialAcceptCommands(
  app: JupyterFrontEnd,
  manager: ICompletionProviderManager,
  provider: CodeLlamaInlineProvider,
  askAgain: (widgetId: string) => void
): void {
  const currentId = () => app.shell.currentWidget?.id ?? '';
  const acceptPart = (split: (text: string) => string) => {
    const ghost = shownGhost(manager, provider, currentId());
    if (ghost && ghost.text) {
      typeIntoEditor(ghost.editor, split(ghost.text));
    }
  };
  app.commands.addCommand(CommandIds.acceptNextWord, {
    label: 'Accept Next Word of Inline Completion',
    isEnabled: () => !!manager.inline?.isActive(currentId()),
    execute: () => acceptPart(nextWord)
  });
  app.commands.addCommand(CommandIds.acceptNextLine, {
    label: 'Accept Next Line of Inline Completion',
    isEnabled: () => !!manager.inline?.isActive(currentId()),
    execute: () => acceptPart(nextLine)
  });
  runBeforeEditor(app, [CommandIds.acceptNextWord, CommandIds.acceptNextLine]);
  app.commands.commandExecuted.connect((_, executed) => {
    if (executed.id !== ACCEPT_ALL) {
      return;
    }
    const widgetId = currentId();
    const suggestion = provider.shownIn(widgetId)?.suggestion;
    if (!suggestion || suggestion.finished) {
      return;
    }
    suggestion.cancel();
    // The accept took what was shown: the rest, if the model has more, comes from a fresh request
    // at the new cursor. After JupyterLab's own handling of the accept's edit.
    setTimeout(() => askAgain(widgetId), 0);
  });
}

/**
 * JupyterLab lets CodeMirror see keys first, and CodeMirror already binds keys
 * like Ctrl+ArrowRight (word jump). While ghost text is shown our bindings must
 * win, so, as JupyterLab does for Tab-to-accept, look for them in the capture
 * phase. The bindings themselves stay in the settings, so users can remap them.
 */
function runBeforeEditor(app: JupyterFrontEnd, commandIds: string[]): void {
  document.addEventListener(
    'keydown',
    event => {
      if (!(event.target instanceof Element)) {
        return;
      }
      const keystroke = CommandRegistry.keystrokeForKeydownEvent(event);
      const binding = app.commands.keyBindings.find(
        b =>
          commandIds.includes(b.command) &&
          b.keys.length === 1 &&
          b.keys[0] === keystroke &&
          (event.target as Element).closest(b.selector) !== null
      );
      if (!binding || !app.commands.isEnabled(binding.command, binding.args)) {
        return;
      }
      event.preventDefault();
      event.stopImmediatePropagation();
      void app.commands.execute(binding.command, binding.args);
    },
    true
  );
}
