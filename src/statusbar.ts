/** The status-bar item: connected or not, GPUs available, runs in flight; a click opens the panel. */

import { Widget } from '@lumino/widgets';

import { statusBarText } from './format';
import { DepinModel } from './model';

export class DepinStatusItem extends Widget {
  constructor(
    private readonly model: DepinModel,
    onClick: () => void
  ) {
    super();
    this.addClass('depin-statusbar');
    this.addClass('jp-StatusBar-TextItem');
    this.node.addEventListener('click', onClick);
    model.changed.connect(this._render, this);
    this._render();
  }

  private _render(): void {
    const m = this.model;
    this.node.textContent = statusBarText(m.status, m.statusError);
    this.node.dataset.state = m.statusError ? 'error' : m.status?.connected ? 'connected' : 'disconnected';
    this.node.title = m.statusError ?? m.status?.message ??
      (m.status?.connections ?? []).map(c => `${c.target}: ${c.description ?? ''}`).join('\n');
  }
}
