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
  volunteer: string | null;
  trust: number | null;
  credit: number | null;
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
