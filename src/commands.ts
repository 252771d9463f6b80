/**
 * "Run cell on DePIN": put `%%depin` on top of the active code cell (kept in the cell, so the saved
 * notebook says what ran and a plain re-run does the same), make sure the magic is loaded in the
 * kernel, then run the cell as Shift+Enter would (without moving on).
 */

import { Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';

import { prependMagic } from './format';
import { execute, LOAD_EXT } from './kernel';

export const CommandIDs = {
  runCell: 'depin:run-cell',
  openPanel: 'depin:open-panel',
  refresh: 'depin:refresh'
};

export async function runCellOnDepin(tracker: INotebookTracker): Promise<void> {
  const panel = tracker.currentWidget;
  const notebook = panel?.content;
  const cell = notebook?.activeCell;
  if (!panel || !notebook || !cell) {
    Notification.error('Run cell on DePIN: open a notebook and select a cell first.', { autoClose: 5000 });
    return;
  }
  if (cell.model.type !== 'code') {
    Notification.error('Run cell on DePIN: the active cell is not a code cell.', { autoClose: 5000 });
    return;
  }
  let next;
  try {
    next = prependMagic(cell.model.sharedModel.getSource());
  } catch (e) {
    Notification.error(`Run cell on DePIN: ${(e as Error).message}`, { autoClose: 8000 });
    return;
  }
  if (next.changed) {
    cell.model.sharedModel.setSource(next.source);
  }
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    Notification.error('Run cell on DePIN: the notebook has no running kernel; start one first.', { autoClose: 5000 });
    return;
  }
  // Queued before the cell on the same kernel; its error (depin-jupyter missing from the kernel's
  // environment, a non-Python kernel) is the kernel's own message.
  const loaded = execute(kernel, LOAD_EXT, true);
  const ran = NotebookActions.run(notebook, panel.sessionContext);
  const r = await loaded;
  if (!r.ok) {
    Notification.error(`Run cell on DePIN: the kernel could not load depin_jupyter: ${r.error}`, { autoClose: 10000 });
  }
  await ran;
}
