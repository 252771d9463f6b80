// Unit tests of the frontend's pure logic (src/format.ts, compiled to lib/format.js by `jlpm build:lib`).
// Run by tests/ui/test_frontend_logic.py with node's built-in test runner: `node --test`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const f = await import(pathToFileURL(path.join(here, '..', '..', 'lib', 'format.js')).href);

test('prependMagic puts %%depin on top, once', () => {
  assert.deepEqual(f.prependMagic('x = 1'), { source: '%%depin\nx = 1', changed: true });
  assert.deepEqual(f.prependMagic('# note\nx = 1'), { source: '%%depin\n# note\nx = 1', changed: true });
  for (const src of ['%%depin\nx = 1', '%%depin --gpu 1\nx', '\n\n%%depin\nx']) {
    assert.deepEqual(f.prependMagic(src), { source: src, changed: false });
  }
  assert.throws(() => f.prependMagic('%%depinx\ny'), /%%depinx/); // another magic, not ours
});

test('prependMagic refuses an empty cell and a cell with another cell magic', () => {
  assert.throws(() => f.prependMagic('  \n'), /empty/);
  assert.throws(() => f.prependMagic('%%time\nx = 1'), /%%time/);
});

test('formatting of sizes, durations, GPUs and utilization', () => {
  assert.equal(f.formatBytes(512), '512 B');
  assert.equal(f.formatBytes(1536), '1.5 KiB');
  assert.equal(f.formatBytes(80 * 2 ** 30), '80.0 GiB');
  assert.equal(f.formatBytes(null), '–');
  assert.equal(f.formatDuration(0.25), '250 ms');
  assert.equal(f.formatDuration(12.34), '12.3 s');
  assert.equal(f.formatDuration(245), '4 min 05 s');
  assert.equal(f.formatMemory(2 ** 30, 4 * 2 ** 30), '1.0 GiB / 4.0 GiB');
  assert.equal(f.formatMemory(null, null), '–');
  assert.equal(f.gpuLabel({ gpus: 0, gpu_model: null }), 'CPU');
  assert.equal(f.gpuLabel({ gpus: 1, gpu_model: 'NVIDIA H100' }), 'NVIDIA H100');
  assert.equal(f.gpuLabel({ gpus: 2, gpu_model: 'NVIDIA A10' }), '2× NVIDIA A10');
  assert.equal(f.formatUtilization(37.4), '37 %');
  assert.equal(f.formatUtilization(null), '–');
});

test('a run\'s energy: joules, watt-hours, not measured (and why), or nothing', () => {
  assert.equal(f.formatEnergy(12.34), '12.3 J');
  assert.equal(f.formatEnergy(3599.9), '3599.9 J');
  assert.equal(f.formatEnergy(3600), '1.00 Wh');
  assert.equal(f.formatEnergy(4500), '1.25 Wh');
  assert.equal(f.formatEnergy(null), '–');
  assert.equal(f.formatEnergy(NaN), '–');
  const measured = f.runEnergy({ energy_j: 812.5, energy: '812.5 J (nvml), GPU mean 250 W, peak 300 W; CPU 1.20 s', energy_reason: null });
  assert.equal(measured.text, '812.5 J');
  assert.match(measured.title, /self-reported.*812\.5 J \(nvml\), GPU mean 250 W/);
  assert.equal(f.runEnergy({ energy_j: 7200, energy: null, energy_reason: null }).text, '2.00 Wh');
  const why = 'no RAPL power counters on this machine (/sys/class/powercap/intel-rapl:*)';
  const none = f.runEnergy({ energy_j: null, energy: `not measured (${why}); CPU 0.03 s`, energy_reason: why });
  assert.equal(none.text, 'not measured');
  assert.equal(none.title, `energy not measured: ${why}\nnot measured (${why}); CPU 0.03 s`);
  assert.deepEqual(f.runEnergy({ energy_j: null, energy: null, energy_reason: null }),
    { text: '–', title: 'no energy figures in this run\'s manifest (incomplete, or stored before energy was measured)' });
  assert.equal(f.runEnergy({}).text, '–'); // an older server that sends no energy fields
});

test('status bar text', () => {
  assert.equal(f.statusBarText(null, null), 'DePIN: …');
  assert.equal(f.statusBarText(null, 'boom'), 'DePIN: server error');
  assert.equal(f.statusBarText({ connected: false }, null), 'DePIN: not connected');
  assert.equal(f.statusBarText({ connected: true, workers: 1, gpus: 0, runs_in_flight: 0 }, null),
    'DePIN: connected · 1 worker · 0 GPUs');
  assert.equal(f.statusBarText({ connected: true, workers: 4, gpus: 1, runs_in_flight: 2 }, null),
    'DePIN: connected · 4 workers · 1 GPU · 2 running');
});

test('store beside the notebook and short run ids', () => {
  assert.equal(f.storeBeside('a/b/nb.ipynb'), 'a/b/depin-results.zarr');
  assert.equal(f.storeBeside('nb.ipynb'), 'depin-results.zarr');
  assert.equal(f.storeBeside(null), 'depin-results.zarr');
  assert.equal(f.shortRunId('20261125T164320.785606Z-adfe1b3c'), '16:43:20 adfe');
  assert.equal(f.shortRunId('custom'), 'custom');
});

test('volunteer columns, CPU label and credit', () => {
  assert.equal(f.showVolunteerColumns([{ volunteer: null, credit: null }]), false);
  assert.equal(f.showVolunteerColumns([{ volunteer: null, credit: null }, { volunteer: 'carol', credit: null }]), true);
  assert.equal(f.showVolunteerColumns([{ volunteer: null, credit: {} }]), true);
  assert.equal(f.cpuLabel({ cpu_model: 'x86_64', cpu_cores: 8 }), 'x86_64 · 8 cores');
  assert.equal(f.cpuLabel({ cpu_model: null, cpu_cores: null }), '');
  assert.equal(f.formatCredit(null), '–');
  assert.equal(f.formatCredit({}), 'none yet');
  assert.equal(f.formatCredit({ tasks: 0, cpu_seconds: 0, gpu_seconds: 0 }), 'none yet');
  assert.equal(f.formatCredit({ tasks: 3, gpu_seconds: 12, cpu_seconds: 0.85 }), '3 tasks · GPU 12.0 s · CPU 850 ms');
  assert.equal(f.formatCredit({ tasks: 1, cpu_seconds: 2, credit: 1.25 }), '1 task · CPU 2.0 s · 1.3 credit');
  assert.equal(f.formatTrust(null), '');
  assert.equal(f.formatTrust({ streak: 0, valid: 0, invalid: 0, checked: 0, trusted: false }), 'new: always replicated');
  assert.equal(f.formatTrust({ streak: 12, valid: 12, invalid: 1, checked: 13, trusted: true }),
    'trusted (spot-checked) · 12/13 valid');
});

test('a reproduce report: the headline and the verdict of a run\'s cell', () => {
  const report = {
    notebook: 'paper/paper.ipynb', store: '/s', verified: true, error: null, ok: false,
    cells: [
      { index: 2, name: 'double', verdict: 'reproduced', detail: '', published_run: 'R1', reproduced_run: 'N1', variables: { y: { verdict: 'identical' } } },
      { index: 3, name: null, verdict: 'differs', detail: 'n differs', published_run: 'R2', reproduced_run: 'N2', variables: {} }
    ]
  };
  assert.equal(f.reproduceHeadline(report), 'NOT REPRODUCED');
  assert.equal(f.reproduceHeadline({ ...report, ok: true }), 'REPRODUCED');
  assert.equal(f.cellForRun(report, { run_id: 'R2', name: null }).index, 3);       // by published run
  assert.equal(f.cellForRun(report, { run_id: 'OLD', name: 'double' }).index, 2);  // an older run of the cell
  assert.equal(f.cellForRun(report, { run_id: 'OLD', name: null }), null);
  assert.equal(f.runVerdictText(report, { run_id: 'R1', name: 'double' }), 'cell 2 (double): reproduced');
  assert.equal(f.runVerdictText(report, { run_id: 'R2', name: null }), 'cell 3: differs – n differs');
  assert.match(f.runVerdictText(report, { run_id: 'X', name: 'gone' }), /not a %%depin cell of paper\/paper.ipynb .*NOT REPRODUCED/);
  assert.match(f.runVerdictText({ ...report, cells: [], error: 'the published store does not verify\nmore' }, { run_id: 'X', name: null }),
    /^NOT REPRODUCED: the published store does not verify$/);
});
