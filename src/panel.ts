/**
 * The DePIN sidebar: the connection of each notebook kernel (with connect/disconnect for the active
 * notebook), a live table of workers with GPU model, memory and utilization, and the run history of
 * the store beside the notebook with status, worker, duration, energy, cached/sealed/verified badges
 * and a Reproduce action.
 */

import type { INotebookTracker } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { fill, h } from './dom';
import {
  cellForRun,
  cpuLabel,
  formatBytes,
  formatCredit,
  formatDuration,
  formatMemory,
  formatUtilization,
  gpuLabel,
  reproduceHeadline,
  runEnergy,
  runVerdictText,
  shortRunId,
  showVolunteerColumns,
  formatTrust,
  storeBeside
} from './format';
import { depinIcon } from './icon';
import { execute, LOAD_EXT } from './kernel';
import { DepinModel } from './model';
import { requestAPI } from './request';
import type { IConnection, IReproduceJob, IRun, IRunDetail, IWorker } from './types';

const TARGET = /^[A-Za-z0-9_.:/@[\]-]*$/;
/** How often a running reproduce job is asked for its state. */
const REPRODUCE_POLL_MS = 1000;

interface INote {
  kind: 'info' | 'error' | 'pending';
  text: string;
}

export class DepinPanel extends Widget {
  constructor(
    private readonly model: DepinModel,
    private readonly tracker: INotebookTracker
  ) {
    super();
    this.id = 'depin-panel';
    this.addClass('depin-panel');
    this.title.icon = depinIcon;
    this.title.caption = 'DePIN: cluster, workers and runs';

    this._target = h('input', {
      className: 'depin-input depin-target-input',
      placeholder: 'local, or a scheduler address tcp://host:8786',
      'aria-label': 'cluster to connect to'
    });
    this._store = h('input', {
      className: 'depin-input depin-store-input',
      'aria-label': 'result store (path from the server root, or a URL)'
    });
    this._store.addEventListener('change', () => {
      this._storeEdited = this._store.value.trim() !== '';
      this.model.store = this._store.value.trim() || this._defaultStore();
      void this.model.refreshRuns(false);
    });
    const connect = h('button', { className: 'depin-button depin-connect' }, 'Connect');
    connect.addEventListener('click', () => void this._connect());
    const disconnect = h('button', { className: 'depin-button depin-disconnect' }, 'Disconnect');
    disconnect.addEventListener('click', () => void this._kernelAction('%depin close'));
    const refresh = h('button', { className: 'depin-button depin-refresh' }, 'Refresh');
    refresh.addEventListener('click', () => void this.model.refresh(true));
    const verify = h('button', { className: 'depin-button depin-verify' }, 'Verify');
    verify.addEventListener('click', () => void this._verify(verify));

    this.node.append(
      h('header', { className: 'depin-header' }, depinIcon.element({ className: 'depin-header-icon' }), 'DePIN'),
      h('section', { className: 'depin-section' },
        h('h3', {}, 'Connection'),
        this._connections,
        h('div', { className: 'depin-form' }, this._target, h('div', { className: 'depin-buttons' }, connect, disconnect)),
        this._connectNote),
      h('section', { className: 'depin-section' }, h('h3', {}, 'Workers'), this._workers),
      h('section', { className: 'depin-section' },
        h('h3', {}, 'Runs'),
        h('div', { className: 'depin-form' }, this._store, h('div', { className: 'depin-buttons' }, refresh, verify)),
        this._runs)
    );
    model.changed.connect(this._render, this);
    tracker.currentChanged.connect(this._onNotebook, this);
    this._onNotebook();
  }

  protected onAfterShow(): void {
    this.model.panelVisible = true;
  }

  protected onAfterHide(): void {
    this.model.panelVisible = false;
  }

  protected onAfterAttach(): void {
    this.model.panelVisible = this.isVisible;
  }

  protected onBeforeDetach(): void {
    this.model.panelVisible = false;
  }

  private _defaultStore(): string {
    return storeBeside(this.tracker.currentWidget?.context.path);
  }

  private _onNotebook(): void {
    if (!this._storeEdited) {
      this._store.value = this._defaultStore();
      if (this._store.value !== this.model.store) {
        this.model.store = this._store.value;
        if (this.isVisible) {
          void this.model.refreshRuns(false);
        }
      }
    }
    this._render();
  }

  private _kernelId(): string | null {
    return this.tracker.currentWidget?.sessionContext.session?.kernel?.id ?? null;
  }

  private async _connect(): Promise<void> {
    const target = this._target.value.trim();
    if (!TARGET.test(target)) {
      this._note(this._connectNote, { kind: 'error', text: `not a cluster address: ${target}` });
      return;
    }
    await this._kernelAction(`%depin connect ${target}`.trim());
  }

  /** Run a `%depin` line in the active notebook's kernel; show the kernel's own answer. */
  private async _kernelAction(line: string): Promise<void> {
    const kernel = this.tracker.currentWidget?.sessionContext.session?.kernel;
    if (!kernel) {
      this._note(this._connectNote, {
        kind: 'error',
        text: 'open a notebook with a running kernel first: the connection belongs to its kernel'
      });
      return;
    }
    this._note(this._connectNote, { kind: 'pending', text: `${line} …` });
    try {
      const r = await execute(kernel, `${LOAD_EXT}\n${line}`);
      const text = r.text.replace(/The depin_jupyter extension is already loaded[^\n]*\n?/, '').trim();
      this._note(this._connectNote, r.ok
        ? { kind: 'info', text: text || 'done' }
        : { kind: 'error', text: [text, r.error].filter(Boolean).join('\n') });
    } catch (e) {
      this._note(this._connectNote, { kind: 'error', text: (e as Error).message });
    }
    await this.model.refresh(true);
  }

  private async _verify(button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    button.textContent = 'Verifying…';
    try {
      await this.model.refreshRuns(true);
    } finally {
      button.disabled = false;
      button.textContent = 'Verify';
    }
  }

  private _note(el: HTMLElement, note: INote | null): void {
    el.className = `depin-note${note ? ` depin-note-${note.kind}` : ''}`;
    fill(el, note?.text ?? '');
  }

  private _render(): void {
    this._renderConnections();
    this._renderWorkers();
    this._renderRuns();
  }

  private _renderConnections(): void {
    const m = this.model;
    if (m.statusError) {
      fill(this._connections, h('div', { className: 'depin-conn', 'data-state': 'error' },
        h('span', { className: 'depin-dot' }), h('b', {}, 'Server error: '), m.statusError));
      return;
    }
    if (!m.status) {
      fill(this._connections, h('div', { className: 'depin-conn' }, 'Loading…'));
      return;
    }
    if (!m.status.connections.length) {
      fill(this._connections, h('div', { className: 'depin-conn', 'data-state': 'disconnected' },
        h('span', { className: 'depin-dot' }), h('b', {}, 'Not connected'),
        h('div', { className: 'depin-sub' }, m.status.message ?? '')));
      return;
    }
    const mine = this._kernelId();
    fill(this._connections, ...m.status.connections.map(c => this._connection(c, mine)));
  }

  private _connection(c: IConnection, mine: string | null): HTMLElement {
    return h('div', { className: 'depin-conn', 'data-state': c.ok ? 'connected' : 'unreachable' },
      h('span', { className: 'depin-dot' }),
      h('b', {}, c.ok ? 'Connected' : 'Unreachable'),
      ' to ',
      h('span', { className: 'depin-target' }, c.target),
      c.kernel_id && c.kernel_id === mine ? h('span', { className: 'depin-badge depin-badge-this' }, 'this notebook') : null,
      c.reproducing ? h('span', { className: 'depin-badge depin-badge-reproducing', title: `the fresh kernel reproducing ${c.reproducing}` }, 'reproducing') : null,
      h('div', { className: 'depin-sub depin-address' }, c.scheduler),
      c.description ? h('div', { className: 'depin-sub' }, c.description) : null,
      c.error ? h('div', { className: 'depin-error' }, c.error) : null);
  }

  private _renderWorkers(): void {
    const live = (this.model.status?.connections ?? []).filter(c => c.ok);
    if (!live.length) {
      fill(this._workers, h('div', { className: 'depin-empty' }, 'No workers: not connected.'));
      return;
    }
    const blocks: HTMLElement[] = [];
    for (const c of live) {
      if (live.length > 1) {
        blocks.push(h('div', { className: 'depin-caption' }, c.target));
      }
      blocks.push(this._workerTable(c.workers));
    }
    fill(this._workers, ...blocks);
  }

  private _workerTable(workers: IWorker[]): HTMLElement {
    if (!workers.length) {
      return h('div', { className: 'depin-empty' }, 'The scheduler has no workers yet.');
    }
    const volunteers = showVolunteerColumns(workers);
    const titles = ['Worker', ...(volunteers ? ['Volunteer'] : []), 'Memory', 'GPU', 'Tasks', ...(volunteers ? ['Credit'] : [])];
    const head = h('tr', {}, ...titles.map(t => h('th', {}, t)));
    const rows = workers.map(w => {
      const gpu = h('td', { className: 'depin-worker-gpu' }, gpuLabel(w));
      if (w.gpu_memory_total !== null || w.gpu_utilization !== null) {
        gpu.append(
          h('div', { className: 'depin-sub' },
            `${formatMemory(w.gpu_memory_used, w.gpu_memory_total)} · ${formatUtilization(w.gpu_utilization)}`),
          utilizationBar(w.gpu_utilization));
      } else if (!w.gpu_model && cpuLabel(w)) {
        gpu.append(h('div', { className: 'depin-sub depin-worker-cpu' }, cpuLabel(w)));
      }
      return h('tr', { className: 'depin-worker', title: w.address },
        h('td', { className: 'depin-worker-name' }, h('b', {}, w.name),
          h('div', { className: 'depin-sub' }, `${w.nthreads} thread${w.nthreads === 1 ? '' : 's'}`)),
        volunteers ? h('td', { className: 'depin-worker-volunteer', title: w.advertised_host ? `host ${w.advertised_host} (as advertised)` : '' },
          w.volunteer ?? '–', w.trust ? h('div', { className: 'depin-sub depin-worker-trust' }, formatTrust(w.trust)) : null) : null,
        h('td', {}, formatMemory(w.memory_used, w.memory_limit)),
        gpu,
        h('td', { className: 'depin-num' }, w.executing),
        volunteers ? h('td', { className: 'depin-worker-credit', title: 'from the coordinator\'s ledger (self-reported by the volunteer)' },
          formatCredit(w.credit)) : null);
    });
    return h('table', { className: `depin-table depin-workers-table${volunteers ? ' depin-workers-volunteers' : ''}` },
      h('thead', {}, head), h('tbody', {}, ...rows));
  }

  private _renderRuns(): void {
    const m = this.model;
    if (m.runsError) {
      fill(this._runs, h('div', { className: 'depin-empty depin-runs-message' }, m.runsError));
      return;
    }
    if (!m.runs) {
      fill(this._runs, h('div', { className: 'depin-empty' }, 'Loading…'));
      return;
    }
    const blocks: HTMLElement[] = [];
    const summary = this._reproductionSummary();
    if (summary) {
      blocks.push(summary);
    }
    const v = m.runs.verify;
    if (v) {
      blocks.push(h('div', { className: `depin-note depin-note-${v.ok ? 'info' : 'error'}` },
        v.ok ? `Verified: ${plural(v.runs_checked, 'run')}, ${plural(v.chunks_checked, 'chunk')} match their digests.`
          : `Verify found ${v.problems.length} problem(s): ${v.problems.slice(0, 3).join('; ')}`));
    }
    if (!m.runs.runs.length) {
      blocks.push(h('div', { className: 'depin-empty' }, `No runs in ${m.runs.store} yet.`));
    }
    for (const r of m.runs.runs) {
      blocks.push(this._runItem(r));
    }
    if (m.runs.total > m.runs.runs.length) {
      blocks.push(h('div', { className: 'depin-empty' }, `${m.runs.total - m.runs.runs.length} older runs not shown.`));
    }
    fill(this._runs, ...blocks);
  }

  private _runItem(r: IRun): HTMLElement {
    const name = h('a', { className: 'depin-run-name', href: '#', title: `${r.run_id}\n${r.detail}\n(click: manifest)` },
      r.name || shortRunId(r.run_id));
    name.addEventListener('click', ev => {
      ev.preventDefault();
      void this._toggleDetail(r.run_id);
    });
    const busy = this._reproduction?.state === 'running';
    const reproduce = h('button', { className: 'depin-button depin-small depin-reproduce', disabled: !r.complete || busy,
      title: 'Re-execute the open notebook in a fresh kernel (cache off) and compare every %%depin run with the store' },
      busy ? 'Reproducing…' : 'Reproduce');
    reproduce.addEventListener('click', () => void this._reproduce(r));
    const note = this._runNotes.get(r.run_id);
    const detail = this._details.get(r.run_id);
    const energy = runEnergy(r);
    return h('div', { className: 'depin-run', 'data-run-id': r.run_id },
      h('div', { className: 'depin-run-line' },
        name,
        h('span', { className: `depin-status depin-status-${r.status.replace(/[^a-z]/g, '')}` }, r.status),
        h('span', { className: 'depin-run-duration' }, formatDuration(r.duration_s)),
        h('span', { className: 'depin-run-energy depin-sub', title: energy.title }, energy.text)),
      h('div', { className: 'depin-run-line depin-sub' },
        h('span', { className: 'depin-run-worker', title: r.worker_address ?? '' },
          r.worker ? `worker ${[r.worker, r.gpu, r.pool ? `pool ${r.pool}` : null].filter(Boolean).join(' · ')}` : '–'),
        h('span', { className: 'depin-badges' },
          r.cached ? h('span', { className: 'depin-badge depin-badge-cached' }, 'cached') : null,
          r.sealed ? h('span', { className: 'depin-badge depin-badge-sealed', title: 'manifest matches its ledger entry' }, 'sealed') : null,
          r.verified === true ? h('span', { className: 'depin-badge depin-badge-verified', title: 'stored bytes re-hashed to their digests' }, 'verified') : null,
          r.verified === false ? h('span', { className: 'depin-badge depin-badge-mismatch', title: r.problems.join('\n') }, 'mismatch') : null),
        reproduce),
      note ? h('div', { className: `depin-note depin-note-${note.kind}` }, note.text) : null,
      detail ? h('pre', { className: 'depin-manifest' }, detail) : null);
  }

  private async _toggleDetail(runId: string): Promise<void> {
    if (this._details.has(runId)) {
      this._details.delete(runId);
      this._renderRuns();
      return;
    }
    const q = new URLSearchParams({ store: this.model.store });
    try {
      const d = await requestAPI<IRunDetail>(`runs/${encodeURIComponent(runId)}?${q.toString()}`);
      this._details.set(runId, describeManifest(d.manifest));
    } catch (e) {
      this._runNotes.set(runId, { kind: 'error', text: (e as Error).message });
    }
    this._renderRuns();
  }

  /**
   * Reproduce the notebook open in the main area (a run's inputs come from its notebook, so a run is
   * reproduced by re-executing the notebook's saved file on the server): start the job, poll it, then
   * show the verdict of this run's cell and the notebook's summary.
   */
  private async _reproduce(run: IRun): Promise<void> {
    const widget = this.tracker.currentWidget;
    if (!widget) {
      this._runNotes.set(run.run_id, { kind: 'error', text: 'open the notebook that produced this run: reproducing re-executes that notebook' });
      this._renderRuns();
      return;
    }
    const notebook = widget.context.path;
    this._runNotes.set(run.run_id, { kind: 'pending', text: `reproducing… (${notebook} runs in a fresh kernel with the cache off)` });
    this._reproduction = { notebook, state: 'running', job: null, report: null, error: null, runId: run.run_id, runName: run.name };
    this._renderRuns();
    try {
      if (widget.context.model.dirty) {
        await widget.context.save(); // the saved file is what the server re-executes
      }
      let job = await requestAPI<IReproduceJob>('reproduce', {
        method: 'POST',
        body: JSON.stringify({ notebook, store: this.model.store })
      });
      this._reproduction.job = job.job;
      while (job.state === 'running') {
        await new Promise(resolve => window.setTimeout(resolve, REPRODUCE_POLL_MS));
        job = await requestAPI<IReproduceJob>(`reproduce/${encodeURIComponent(job.job)}`);
      }
      if (job.state === 'done' && job.report) {
        const report = job.report;
        this._reproduction = { ...this._reproduction, state: 'done', report };
        const cell = cellForRun(report, run);
        const good = report.ok || (cell !== null && cell.verdict === 'reproduced' && !report.error);
        this._runNotes.set(run.run_id, { kind: good ? 'info' : 'error', text: runVerdictText(report, run) });
      } else {
        const error = job.error || 'the reproduce job failed without a message';
        this._reproduction = { ...this._reproduction, state: 'failed', error };
        this._runNotes.set(run.run_id, { kind: 'error', text: `reproduce failed: ${error}` });
      }
    } catch (e) {
      const error = (e as Error).message;
      this._reproduction = { ...this._reproduction, state: 'failed', error };
      this._runNotes.set(run.run_id, { kind: 'error', text: error });
    }
    this._renderRuns();
  }

  /** REPRODUCED / NOT REPRODUCED for the whole notebook, with its cells and variables in an expander. */
  private _reproductionSummary(): HTMLElement | null {
    const r = this._reproduction;
    if (!r || r.state !== 'done' || !r.report) {
      return null;
    }
    const report = r.report;
    const items: HTMLElement[] = [];
    for (const c of report.cells) {
      items.push(h('li', { className: 'depin-repro-cell', 'data-verdict': c.verdict },
        h('b', {}, `cell ${c.index}${c.name ? ` (${c.name})` : ''}`), `: ${c.verdict}`,
        c.detail ? h('span', { className: 'depin-sub' }, ` – ${c.detail}`) : null,
        Object.keys(c.variables).length ? h('ul', {}, ...Object.entries(c.variables).map(([name, v]) =>
          h('li', { className: 'depin-repro-var', 'data-verdict': v.verdict }, h('code', {}, name), `: ${v.verdict}`,
            v.detail ? h('span', { className: 'depin-sub' }, ` (${v.detail})`) : null))) : null));
    }
    // Re-rendered on every poll: the expander keeps its state in the panel.
    const details = h('details', { className: 'depin-repro-details', open: this._reproductionOpen },
      h('summary', {}, `${report.cells.length} %%depin cell${report.cells.length === 1 ? '' : 's'} of ${r.notebook}`),
      report.error ? h('pre', { className: 'depin-error' }, report.error) : null,
      h('ul', { className: 'depin-repro-cells' }, ...items),
      h('div', { className: 'depin-sub' }, `published store: ${report.store}`));
    details.addEventListener('toggle', () => {
      this._reproductionOpen = details.open;
    });
    const close = h('button', { className: 'depin-button depin-small', title: 'hide this report' }, '×');
    close.addEventListener('click', () => {
      this._reproduction = null;
      this._renderRuns();
    });
    return h('div', { className: `depin-reproduction depin-note depin-note-${report.ok ? 'info' : 'error'}`, 'data-ok': String(report.ok) },
      h('div', { className: 'depin-run-line' }, h('b', { className: 'depin-repro-headline' }, reproduceHeadline(report)), close),
      details);
  }

  private _connections = h('div', { className: 'depin-connections' });
  private _connectNote = h('div', { className: 'depin-note' });
  private _workers = h('div', { className: 'depin-workers' });
  private _runs = h('div', { className: 'depin-runs' });
  private _target: HTMLInputElement;
  private _store: HTMLInputElement;
  private _storeEdited = false;
  private _runNotes = new Map<string, INote>();
  private _details = new Map<string, string>();
  private _reproduction: IReproduction | null = null;
  private _reproductionOpen = false;
}

/** The notebook's last reproduction from this panel. */
interface IReproduction {
  notebook: string;
  state: 'running' | 'done' | 'failed';
  job: string | null;
  report: IReproduceJob['report'] | null;
  error: string | null;
  runId: string;
  runName: string | null;
}

function plural(n: number, noun: string): string {
  return `${n} ${noun}${n === 1 ? '' : 's'}`;
}

/** A thin bar for a utilization percentage (empty when unknown). */
function utilizationBar(u: number | null): HTMLElement {
  const bar = h('div', { className: 'depin-bar' }, h('div', { className: 'depin-bar-fill' }));
  (bar.firstChild as HTMLElement).style.width = `${Math.max(0, Math.min(100, u ?? 0))}%`;
  return bar;
}

/** The parts of a manifest a person reads first: code, outputs, worker, timings. */
function describeManifest(m: { [key: string]: any }): string {
  const lines: string[] = [];
  const outputs = Object.entries(m.outputs ?? {}).map(([k, o]: [string, any]) =>
    `  ${k}: ${o.kind}${o.shape ? ` ${JSON.stringify(o.shape)}` : ''}${o.dtype ? ` ${o.dtype}` : ''}${o.nbytes ? ` (${formatBytes(o.nbytes)})` : ''}`);
  lines.push(`run ${m.run_id} · ${m.status} · ${m.created}`);
  lines.push('code:', ...String(m.code?.text ?? '').split('\n').slice(0, 12).map(l => `  ${l}`));
  lines.push('outputs:', ...(outputs.length ? outputs : ['  (none)']));
  const w = m.worker ?? {};
  lines.push(`worker: ${[w.name, w.address, w.host, w.cpu].filter(Boolean).join(' · ')}`);
  for (const g of w.gpus ?? []) {
    lines.push(`  GPU ${g.index ?? ''}: ${g.name ?? '?'} ${g.memory_bytes ? formatBytes(g.memory_bytes) : ''}`);
  }
  const t = Object.entries(m.timings ?? {}).map(([k, v]) => `${k}=${Number(v).toFixed(3)}`);
  if (t.length) {
    lines.push(`timings: ${t.join(' ')}`);
  }
  return lines.join('\n');
}
