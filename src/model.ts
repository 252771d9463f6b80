/**
 * One poller shared by the panel and the status bar: status every few seconds while the panel is
 * visible, every 15 s otherwise (for the status bar), nothing while the browser tab is hidden.
 */

import { Signal, ISignal } from '@lumino/signaling';

import { requestAPI } from './request';
import type { IRuns, IStatus } from './types';

const BACKGROUND_MS = 15000;

export class DepinModel {
  /** Refresh interval while the panel is visible (settings: refreshSeconds). */
  fastMs = 3000;
  status: IStatus | null = null;
  statusError: string | null = null;
  runs: IRuns | null = null;
  runsError: string | null = null;
  store = '';

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get panelVisible(): boolean {
    return this._panelVisible;
  }

  set panelVisible(v: boolean) {
    if (v === this._panelVisible) {
      return;
    }
    this._panelVisible = v;
    if (v) {
      void this.refresh(true);
    } else {
      this._schedule();
    }
  }

  start(): void {
    document.addEventListener('visibilitychange', this._onVisibility);
    void this.refresh(false);
  }

  dispose(): void {
    document.removeEventListener('visibilitychange', this._onVisibility);
    window.clearTimeout(this._timer);
    this._disposed = true;
  }

  /** Poll now (status, and runs when the panel shows them), then schedule the next poll. */
  async refresh(withRuns = this._panelVisible): Promise<void> {
    window.clearTimeout(this._timer);
    try {
      this.status = await requestAPI<IStatus>('status');
      this.statusError = null;
    } catch (e) {
      this.statusError = (e as Error).message;
    }
    if (withRuns) {
      await this.refreshRuns(false);
    }
    this._changed.emit();
    this._schedule();
  }

  /** Read the run history of ``this.store``; ``verify`` re-hashes the stored bytes first. */
  async refreshRuns(verify: boolean, emit = true): Promise<void> {
    const q = new URLSearchParams({ store: this.store });
    if (verify) {
      q.set('verify', '1');
    }
    try {
      const runs = await requestAPI<IRuns>(`runs?${q.toString()}`);
      if (runs.store !== this._verdictStore) {
        this._verdicts.clear();
        this._verdictStore = runs.store;
      }
      for (const r of runs.runs) {
        if (r.verified !== null) {
          // Sealed runs do not change: a verdict holds until the next Verify re-checks the bytes.
          this._verdicts.set(r.run_id, { verified: r.verified, problems: r.problems });
        } else if (this._verdicts.has(r.run_id)) {
          Object.assign(r, this._verdicts.get(r.run_id));
        }
      }
      if (!verify && this.runs?.verify && this.runs.store === runs.store) {
        runs.verify = this.runs.verify;
      }
      this.runs = runs;
      this.runsError = null;
    } catch (e) {
      this.runs = null;
      this.runsError = (e as Error).message;
    }
    if (emit) {
      this._changed.emit();
    }
  }

  private _schedule(): void {
    window.clearTimeout(this._timer);
    if (this._disposed || document.hidden) {
      return;
    }
    const ms = this._panelVisible ? this.fastMs : BACKGROUND_MS;
    this._timer = window.setTimeout(() => void this.refresh(), ms);
  }

  private _onVisibility = (): void => {
    if (document.hidden) {
      window.clearTimeout(this._timer);
    } else {
      void this.refresh();
    }
  };

  private _changed = new Signal<this, void>(this);
  private _verdicts = new Map<string, { verified: boolean; problems: string[] }>();
  private _verdictStore = '';
  private _panelVisible = false;
  private _timer = 0;
  private _disposed = false;
}
