/**
 * The JSON the server routes answer (depin_jupyter/server/manager.py is the source of truth).
 */

export interface IWorker {
  address: string;
  name: string;
  host: string | null;
  status: string | null;
  nthreads: number;
  memory_limit: number | null;
  memory_used: number | null;
  cpu_percent: number | null;
  gpus: number;
  gpu_model: string | null;
  gpu_memory_total: number | null;
  gpu_memory_used: number | null;
  gpu_utilization: number | null;
  executing: number;
  depin_runs: number;
  /** What a volunteer advertised when it joined (self-reported): CPU model and cores, host. */
  cpu_model?: string | null;
  cpu_cores?: number | null;
  advertised_host?: string | null;
  /** Volunteer networks only: the certificate name of the volunteer running this worker. */
  volunteer: string | null;
  /** Reputation from replicated runs (null when unknown). */
  trust: ITrust | null;
  /** The coordinator's ledger entry: {} when nothing is earned yet, null when unknown. */
  credit: ICredit | null;
}

export interface ITrust {
  streak: number;
  valid: number;
  invalid: number;
  checked: number;
  /** Streak long enough that the volunteer is only spot-checked. */
  trusted: boolean;
}

export interface ICredit {
  cpu_seconds?: number;
  gpu_seconds?: number;
  tasks?: number;
  cpu_used_seconds?: number;
  credit?: number;
  [key: string]: number | undefined;
}

export interface IConnection {
  pid: number | null;
  kernel_id: string | null;
  scheduler: string;
  description: string | null;
  embedded: boolean;
  target: string;
  started: number | null;
  ok: boolean;
  error: string | null;
  workers: IWorker[];
  gpus: number;
  runs_in_flight: number;
  volunteer?: boolean;
  /** The notebook a panel reproduce job is re-executing in this kernel, if it is one. */
  reproducing?: string | null;
}

export interface IStatus {
  connected: boolean;
  message: string | null;
  connections: IConnection[];
  workers: number;
  gpus: number;
  runs_in_flight: number;
}

export interface IRun {
  run_id: string;
  name: string | null;
  status: string;
  complete: boolean;
  sealed: boolean;
  created: string;
  outputs: string[];
  cache_key: string | null;
  detail: string;
  worker: string | null;
  worker_address: string | null;
  gpu: string | null;
  duration_s: number | null;
  cached: boolean;
  verified: boolean | null;
  problems: string[];
  /** Joules the worker measured (self-reported); null when not measured or the run has no figures. */
  energy_j: number | null;
  /** The one-line energy summary (`energy.summary`); null when the manifest has no energy figures. */
  energy: string | null;
  /** Why the energy was not measured (no power counter readable...); null when measured or absent. */
  energy_reason: string | null;
  gpu_power_mean_w: number | null;
  /** The worker pool the run was restricted to; null: any worker. */
  pool: string | null;
}

export interface IRuns {
  store: string;
  runs: IRun[];
  total: number;
  verify: {
    ok: boolean;
    problems: string[];
    runs_checked: number;
    chunks_checked: number;
  } | null;
}

export interface IRunDetail {
  store: string;
  run_id: string;
  manifest: { [key: string]: any };
}

/** One variable of a reproduced cell (depin_jupyter/reproduce.py, reproduce-report-schema.json). */
export interface IVariableVerdict {
  verdict: string;
  detail?: string | null;
  max_abs?: number | null;
  max_rel?: number | null;
}

export interface ICellVerdict {
  index: number;
  name: string | null;
  verdict: string;
  detail: string;
  published_run: string | null;
  reproduced_run: string | null;
  variables: { [name: string]: IVariableVerdict };
}

export interface IReproduceReport {
  notebook: string;
  store: string;
  verified: boolean;
  cells: ICellVerdict[];
  error: string | null;
  ok: boolean;
}

/** POST depin/reproduce answers the job; GET depin/reproduce/{job} its state. */
export interface IReproduceJob {
  job: string;
  notebook: string;
  store: string;
  state: 'running' | 'done' | 'failed';
  started: number;
  finished: number | null;
  report?: IReproduceReport;
  error?: string;
}
