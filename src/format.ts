/**
 * Pure helpers (no JupyterLab imports): formatting and the cell-source rule of "Run cell on DePIN".
 * Unit-tested with node's test runner (tests/ui/frontend.test.mjs).
 */

import type { ICellVerdict, ICredit, IReproduceReport, IRun, IStatus, ITrust, IWorker } from './types';

/** The magic line the command puts on top of a cell. */
export const MAGIC = '%%depin';

/** 1536 -> "1.5 KiB"; null/undefined -> "–". */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n)) {
    return '–';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${Math.round(v)} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** Seconds as "850 ms", "12.3 s", "4 min 05 s". */
export function formatDuration(s: number | null | undefined): string {
  if (s === null || s === undefined || !isFinite(s)) {
    return '–';
  }
  if (s < 1) {
    return `${Math.round(s * 1000)} ms`;
  }
  if (s < 60) {
    return `${s.toFixed(1)} s`;
  }
  const m = Math.floor(s / 60);
  const rest = Math.round(s - m * 60);
  return `${m} min ${String(rest).padStart(2, '0')} s`;
}

/** "used / total" memory, or whichever is known. */
export function formatMemory(used: number | null, total: number | null): string {
  if (used === null && total === null) {
    return '–';
  }
  if (used === null) {
    return formatBytes(total);
  }
  if (total === null) {
    return formatBytes(used);
  }
  return `${formatBytes(used)} / ${formatBytes(total)}`;
}

/** The GPU column: "2× NVIDIA H100", "NVIDIA A10", or "CPU". */
export function gpuLabel(w: IWorker): string {
  if (!w.gpus && !w.gpu_model) {
    return 'CPU';
  }
  const model = w.gpu_model ?? 'GPU';
  return w.gpus > 1 ? `${w.gpus}× ${model}` : model;
}

/** GPU utilization as "37 %", or "–" where NVML reports none. */
export function formatUtilization(u: number | null | undefined): string {
  return u === null || u === undefined ? '–' : `${Math.round(u)} %`;
}

/** The status-bar text: connected or not, GPUs available, runs in flight. */
export function statusBarText(s: IStatus | null, error: string | null): string {
  if (error) {
    return 'DePIN: server error';
  }
  if (!s) {
    return 'DePIN: …';
  }
  if (!s.connected) {
    return 'DePIN: not connected';
  }
  const gpus = `${s.gpus} GPU${s.gpus === 1 ? '' : 's'}`;
  const workers = `${s.workers} worker${s.workers === 1 ? '' : 's'}`;
  const runs = s.runs_in_flight ? ` · ${s.runs_in_flight} running` : '';
  return `DePIN: connected · ${workers} · ${gpus}${runs}`;
}

/** The result of putting the magic on top of a cell. */
export interface IPrepend {
  source: string;
  changed: boolean;
}

/**
 * The cell source with `%%depin` as its first line (unchanged if it is there already).
 * Throws an Error with a message for the user when the cell cannot run under `%%depin`.
 */
export function prependMagic(source: string): IPrepend {
  const lines = source.split('\n');
  const first = lines.findIndex(l => l.trim() !== '');
  if (first === -1) {
    throw new Error('the cell is empty: write the code to run on the cluster first');
  }
  const head = lines[first].trim();
  if (head === MAGIC || head.startsWith(MAGIC + ' ')) {
    return { source, changed: false };
  }
  if (head.startsWith('%%')) {
    const other = head.split(/\s+/)[0];
    throw new Error(
      `the cell starts with the cell magic ${other}; a cell takes one cell magic, so ` +
        `${MAGIC} cannot be added. Move the ${other} line, or run the cell yourself.`
    );
  }
  return { source: `${MAGIC}\n${source}`, changed: true };
}

/** The default store beside a notebook: "dir/depin-results.zarr" (server-root relative path). */
export function storeBeside(notebookPath: string | null | undefined): string {
  if (!notebookPath) {
    return 'depin-results.zarr';
  }
  const slash = notebookPath.lastIndexOf('/');
  const dir = slash === -1 ? '' : notebookPath.slice(0, slash);
  return dir ? `${dir}/depin-results.zarr` : 'depin-results.zarr';
}

/** A run id shortened for the table: the time part and the first hex of its suffix. */
export function shortRunId(runId: string): string {
  const m = /^(\d{8})T(\d{2})(\d{2})(\d{2})\.\d+Z-([0-9a-z]{4})/.exec(runId);
  if (!m) {
    return runId.length > 16 ? runId.slice(0, 16) + '…' : runId;
  }
  return `${m[2]}:${m[3]}:${m[4]} ${m[5]}`;
}

/** Joules as "12.3 J", or "1.25 Wh" from 3600 J on (as `depin credits` writes them); "–" when unknown. */
export function formatEnergy(joules: number | null | undefined): string {
  if (joules === null || joules === undefined || !isFinite(joules)) {
    return '–';
  }
  return joules >= 3600 ? `${(joules / 3600).toFixed(2)} Wh` : `${joules.toFixed(1)} J`;
}

/** The text and tooltip of a run's energy cell. */
export interface IEnergyCell {
  text: string;
  title: string;
}

/**
 * A run's energy cell: the joules measured, "not measured" (the tooltip says why, with the full summary),
 * or "–" for a run whose manifest has no energy figures (incomplete, or stored before energy was measured).
 */
export function runEnergy(r: Pick<IRun, 'energy_j' | 'energy' | 'energy_reason'>): IEnergyCell {
  const summary = r.energy ?? null;
  if (typeof r.energy_j === 'number' && isFinite(r.energy_j)) {
    const detail = summary ?? formatEnergy(r.energy_j);
    return { text: formatEnergy(r.energy_j), title: `energy (self-reported by the worker): ${detail}` };
  }
  if (summary === null && !r.energy_reason) {
    return { text: '–', title: 'no energy figures in this run\'s manifest (incomplete, or stored before energy was measured)' };
  }
  const reason = r.energy_reason || 'no power counter';
  return { text: 'not measured', title: `energy not measured: ${reason}${summary ? `\n${summary}` : ''}` };
}

/** The CPU a volunteer advertised: "x86_64 · 8 cores" ('' when unknown). */
export function cpuLabel(w: Pick<IWorker, 'cpu_model' | 'cpu_cores'>): string {
  const cores = w.cpu_cores ? `${w.cpu_cores} core${w.cpu_cores === 1 ? '' : 's'}` : '';
  return [w.cpu_model, cores].filter(Boolean).join(' · ');
}

/** A volunteer's credit: "3 tasks · GPU 12.0 s · CPU 850 ms"; "none yet" for {}; "–" when unknown. */
export function formatCredit(c: ICredit | null | undefined): string {
  if (c === null || c === undefined) {
    return '–';
  }
  const parts: string[] = [];
  const tasks = Number(c.tasks ?? 0);
  if (tasks) {
    parts.push(`${tasks} task${tasks === 1 ? '' : 's'}`);
  }
  if (c.gpu_seconds) {
    parts.push(`GPU ${formatDuration(c.gpu_seconds)}`);
  }
  if (c.cpu_seconds) {
    parts.push(`CPU ${formatDuration(c.cpu_seconds)}`);
  }
  if (typeof c.credit === 'number' && c.credit) {
    parts.push(`${c.credit.toFixed(1)} credit`);
  }
  return parts.length ? parts.join(' · ') : 'none yet';
}

/** A volunteer's trust: "new", or "replicated|trusted · valid/checked valid". */
export function formatTrust(t: ITrust | null | undefined): string {
  if (t === null || t === undefined) {
    return '';
  }
  if (!t.checked) {
    return 'new: always replicated';
  }
  return `${t.trusted ? 'trusted (spot-checked)' : 'replicated'} · ${t.valid}/${t.checked} valid`;
}

/** Whether the workers table shows the Volunteer and Credit columns (only on volunteer networks). */
export function showVolunteerColumns(workers: Pick<IWorker, 'volunteer' | 'credit'>[]): boolean {
  return workers.some(w => !!w.volunteer || (w.credit !== null && w.credit !== undefined));
}

/** The whole notebook's verdict line. */
export function reproduceHeadline(r: IReproduceReport): string {
  return r.ok ? 'REPRODUCED' : 'NOT REPRODUCED';
}

/**
 * The verdict of the cell that produced a run: the cell whose published run it is, else the cell
 * with the run's --name (an older run of the same cell). Null: the run's cell is not in the notebook.
 */
export function cellForRun(
  r: IReproduceReport,
  run: { run_id: string; name: string | null }
): ICellVerdict | null {
  return r.cells.find(c => c.published_run === run.run_id) ??
    (run.name ? r.cells.find(c => c.name === run.name) : undefined) ??
    null;
}

/** One line for a run's cell: "reproduced", "differs: y differs", or why there is no verdict. */
export function runVerdictText(r: IReproduceReport, run: { run_id: string; name: string | null }): string {
  if (r.error) {
    return `${reproduceHeadline(r)}: ${r.error.split('\n')[0]}`;
  }
  const cell = cellForRun(r, run);
  if (!cell) {
    return `this run's cell is not a %%depin cell of ${r.notebook} (the notebook as a whole: ${reproduceHeadline(r)})`;
  }
  return `cell ${cell.index}${cell.name ? ` (${cell.name})` : ''}: ${cell.verdict}${cell.detail ? ` – ${cell.detail}` : ''}`;
}
