#!/usr/bin/env bash
# The GPU path of depin-jupyter proven on a real GPU in one prepared run (issue #23).
#
#   bash benchmarks/gpu_proof.sh [--dry-run] [--out DIR] [--install pip|wheelhouse|image|none]
#                                [--wheelhouse DIR] [--venv DIR] [--python PY] [--steps a,b] [--budget S]
#   bash benchmarks/gpu_proof.sh prepare-wheelhouse [--for image|full] [--dir DIR] [--python-version 3.12]
#
# From a clean checkout it makes a venv, installs the project with its GPU extra, then runs, each under
# its own time limit (GPU run; the dry run's limits are longer, for a 2-core CPU machine):
#   install     150 s  venv + `pip install -e ".[test,gpu]"` (--prefer-binary; offline from a wheelhouse)
#   gpu-env      20 s  nvidia-smi, cupy (NVRTC, cuBLAS, cuFFT, cuRAND), dask-cuda, NVML board power
#   pytest-gpu   80 s  `pytest -m gpu`: every GPU test passes, none skipped
#   embedded     50 s  a real kernel: %%depin starts LocalCUDACluster and says so, --gpu routes, --gpu-mem
#                      errors clearly, cupy results stay cupy (in the kernel's GPU memory)
#   volunteer    70 s  `depin scheduler` + `depin worker TOKEN` (dask-cuda), GPU model/memory advertised,
#                      a sandboxed cell on the GPU, NVML joules in the run's manifest, graceful teardown
#   benchmark    80 s  benchmarks/gpu.py: %%depin >= 0.9x direct cupy (>= 1 s workload), field == numpy
#   notebooks    80 s  notebooks/heat_diffusion.ipynb and notebooks/virtual-lab/gpu_speedup_lab.ipynb
# The limits sum to 530 s, under the 540 s --budget that caps the whole run (one device command may run
# 600 s). It writes $OUT/summary.json (each step: pass / fail / "skipped: no GPU", duration, checks, key
# figures), $OUT/proof.log and $OUT/logs.tar.gz (three files: the device returns at most eight), and exits
# non-zero if any step failed. OUT defaults to ./gpu-proof-out.
#
# --dry-run (or DEPIN_GPU_PROOF_DRY=1): on a machine without a GPU, run every step's plumbing (venv,
# limits, summary, the kernel, scheduler + worker start and teardown, the notebooks) and report the
# checks that need a GPU as "skipped: no GPU". Without --dry-run a skipped check fails its step.
#
# THE GPU MACHINE HAS NO NETWORK. Its image has python3 3.12 with cupy-cuda13x, numba-cuda, nvidia-ml-py
# and CUDA 13 libraries, but not dask, distributed, dask-cuda, zarr, IPython, ipykernel or nbclient. The
# full [test,gpu] wheelhouse for Python 3.12 is 207 wheels, 2017 MiB (cupy-cuda12x[ctk] with the CUDA 12
# libraries; 523 MB without them): far over the 64 MiB the device tool carries, so that install needs a GPU
# machine with its own package access (prepare-wheelhouse --for full says so and exits 3). What fits (80
# wheels, 46 MiB) is the `image` install: a venv over the image's python3 (its cupy-cuda13x and CUDA
# stack) with only the missing wheels carried; it proves the GPU path with cupy-cuda13x, not the extra's
# cupy-cuda12x:
#   here:   bash benchmarks/gpu_proof.sh prepare-wheelhouse --for image   # -> .gpu-proof-wheels/ (git-ignored)
#   device: run(command="bash benchmarks/gpu_proof.sh --install image --wheelhouse .gpu-proof-wheels",
#               carry=[".gpu-proof-wheels"], timeout_s=600)
# (The device tool sends the checkout the session started in: this branch must be what it holds.)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PY="${DEPIN_GPU_PROOF_PYTHON:-python3}"

die() { echo "gpu_proof.sh: $*" >&2; exit 1; }

# _install --mode M --venv V --work W --python PY [--wheelhouse DIR] [--dry-run]: the install step.
install() {
    local mode=pip venv="" work="" base="$PY" wheelhouse="" dry=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --mode) mode="$2"; shift 2;;
            --venv) venv="$2"; shift 2;;
            --work) work="$2"; shift 2;;
            --python) base="$2"; shift 2;;
            --wheelhouse) wheelhouse="$2"; shift 2;;
            --dry-run) dry=1; shift;;
            *) die "_install: unknown option $1";;
        esac
    done
    [ -n "$venv" ] && [ -n "$work" ] || die "_install needs --venv and --work"
    if [ "$mode" = none ]; then
        [ -x "$venv/bin/python" ] || die "--install none: no venv at $venv"
        echo "reusing the venv at $venv"
        return 0
    fi
    local opts=(--prefer-binary --progress-bar off --disable-pip-version-check)
    if [ "$mode" = wheelhouse ] || [ "$mode" = image ]; then
        [ -d "$wheelhouse" ] || die "--install $mode needs --wheelhouse DIR (bash $0 prepare-wheelhouse)"
        opts+=(--no-index --find-links "$wheelhouse")
        [ -f "$wheelhouse/wheelhouse.json" ] && cat "$wheelhouse/wheelhouse.json"
    fi
    rm -rf "$venv"
    if [ "$mode" = image ]; then
        # A venv over the base python's own packages (the device image's cupy-cuda13x, CUDA libraries, NVML,
        # pip): its site-packages are added after the venv's, their .pth files processed (site.addsitedir).
        "$base" -m venv --without-pip "$venv" || die "could not make a venv with $base"
        local sp base_sites
        sp="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || die "no venv python"
        base_sites="$("$base" -c 'import site, sys; print(repr([p for p in site.getsitepackages() if p.startswith(sys.prefix)]))')"
        echo "import site; list(map(site.addsitedir, $base_sites))" > "$sp/_depin_gpu_proof_base.pth"
        echo "over the base python's site-packages: $base_sites"
        "$venv/bin/python" -m pip --version || die "no pip importable from $base's site-packages"
    else
        "$base" -m venv "$venv" || die "could not make a venv with $base"
    fi
    local pip=("$venv/bin/python" -m pip install "${opts[@]}")
    # The build backend first, then the project without build isolation: nothing is fetched to build it.
    "${pip[@]}" "hatchling>=1.5" "hatch-jupyter-builder>=0.9" editables || die "could not install the build backend"
    # The proof needs no JupyterLab extension build (jlpm needs node and the npm registry: the GPU machine
    # has neither); a checkout that carries depin_jupyter/labextension still ships it.
    export SKIP_JUPYTER_BUILDER=1
    case "$mode" in
        pip|wheelhouse)
            local extras="test,gpu"
            # The dry run installs no CUDA wheels; it resolves [test,gpu] below instead.
            [ "$dry" = 1 ] && extras="test"
            "${pip[@]}" --no-build-isolation -e "$REPO[$extras]" || die "pip install -e .[$extras] failed"
            if [ "$dry" = 1 ]; then
                "${pip[@]}" --no-build-isolation --dry-run --ignore-installed --quiet --report "$work/gpu-extra-resolution.json" \
                    -e "$REPO[test,gpu]" || die "the [test,gpu] extras do not resolve"
                echo "resolved [test,gpu] (not installed): $work/gpu-extra-resolution.json"
            fi;;
        image)
            "${pip[@]}" --no-build-isolation --no-deps -e "$REPO" || die "pip install -e . failed"
            "$venv/bin/python" "$HERE/gpu_proof.py" requirements --for image > "$work/requirements-image.txt" \
                || die "could not list the image install's requirements"
            cat "$work/requirements-image.txt"
            "${pip[@]}" -r "$work/requirements-image.txt" || die "the image install's requirements failed";;
        *) die "unknown install mode $mode";;
    esac
    "$venv/bin/python" -m pip list --format=freeze > "$work/logs/pip-freeze.txt" 2>/dev/null || true
    echo "installed in $venv"
}

case "${1:-}" in
    _install) shift; install "$@";;
    prepare-wheelhouse) shift; exec "$PY" "$HERE/gpu_proof.py" prepare-wheelhouse "$@";;
    -h|--help) awk 'NR > 1 && /^set -uo/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0";;
    *) exec "$PY" "$HERE/gpu_proof.py" run "$@";;
esac
