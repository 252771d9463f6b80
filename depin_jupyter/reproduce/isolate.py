"""Where `depin reproduce` runs the author's notebook: a scratch directory the published store is not part of,
a guard that refuses any open of the published store, and optionally a sandbox around the whole re-execution.

* Scratch: a fresh directory holding only the notebook (outputs stripped, so printed answers are not there to
  copy) and the files it declares; the new runs go to a scratch store; the published store stays where it is,
  read only by the comparison.
* Guard: every Python process of the re-execution (kernel, embedded Dask workers) starts with an audit hook
  (``sitecustomize``) that refuses opening, listing or linking anything under the published store and bundle,
  and logs each attempt; a cell that tries is named in the report. Code that leaves Python (ctypes, a
  subprocess running another program) is not seen by it: that is what the sandbox is for.
* Sandbox (``--sandbox``): the re-execution (nbclient, the kernel and its cluster) runs in a child process with a
  scratch HOME, a minimal environment (no tokens, credentials or DASK_* settings of the reviewer) and, when
  bubblewrap works here, inside it: the file system read-only, home directories, /tmp, /run, /mnt, /media and the
  bundle hidden, only the scratch directory writable, no network (unless ``--cluster`` needs it), its own PIDs.
  Without bubblewrap the child still runs with the reviewer's user rights on the reviewer's files.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GUARD_MESSAGE", "Scratch", "execute", "guard_hits", "prepare"]

GUARD_MESSAGE = "depin reproduce: the published store is not readable while the notebook is re-executed"
_HIDDEN = ("/home", "/root", "/run", "/tmp", "/var/tmp", "/mnt", "/media")
_ENV_PASS = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TERM", "CUDA_VISIBLE_DEVICES",
             "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MPLBACKEND")

_GUARD = '''"""depin reproduce's guard: refuse (and log) any access to the published store or bundle."""
import json as _json
import os as _os
import sys as _sys


def _install():
    roots = [_os.path.realpath(r) for r in _json.loads(_os.environ.get("DEPIN_REPRODUCE_FORBID") or "[]")]
    log = _os.environ.get("DEPIN_REPRODUCE_GUARD_LOG")
    if not roots:
        return
    fd = _os.open(log, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o600) if log else None
    realpath, fspath, write, sep, getpid = _os.path.realpath, _os.fspath, _os.write, _os.sep, _os.getpid
    events = {"open", "os.listdir", "os.scandir", "os.symlink", "os.link", "shutil.copytree", "shutil.copyfile"}

    def hook(event, args):
        if event not in events or not args or isinstance(args[0], int):
            return
        try:
            path = fspath(args[0])
            path = realpath(path.decode(errors="replace") if isinstance(path, bytes) else path)
        except Exception:
            return
        if not any(path == r or path.startswith(r + sep) for r in roots):
            return
        if fd is not None:
            write(fd, (_json.dumps({"event": event, "path": path, "pid": getpid()}) + "\\n").encode())
        raise PermissionError(MESSAGE + f" ({event} {path}): a reproduction computes its results, it does not "
                              "copy them; remove this access from the notebook")

    _sys.addaudithook(hook)


MESSAGE = %r
_install()
'''


@dataclass(frozen=True)
class Scratch:
    """The directories of one re-execution."""

    root: pathlib.Path
    work: pathlib.Path
    store: pathlib.Path
    home: pathlib.Path
    guard_log: pathlib.Path
    forbidden: tuple[str, ...]
    copied: tuple[str, ...] = field(default_factory=tuple)

    @property
    def notebook(self) -> pathlib.Path:
        return self.work / "notebook.ipynb"


def prepare(nb: Any, nb_dir: pathlib.Path, files: Sequence[str], forbidden: Sequence[str]) -> Scratch:
    """A scratch directory with the notebook (outputs stripped) and its declared ``files``; none of
    ``forbidden`` (the published store, the bundle) is copied or reachable from it."""
    import nbformat

    root = pathlib.Path(tempfile.mkdtemp(prefix="depin-reproduce-"))
    os.chmod(root, 0o700)
    work, home = root / "work", root / "home"
    for d in (work, home, root / "tmp", root / "guard"):
        d.mkdir()
    banned = [pathlib.Path(f).resolve() for f in forbidden]
    here = nb_dir.resolve()
    never = [b for b in banned if not (b == here or b in here.parents)]  # the store; a bundle ships the files
    copied = []
    for name in files:
        src = (nb_dir / name).resolve()
        if any(src == b or b in src.parents for b in never) or not src.is_file():
            continue
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copied.append(name)
    clean = nbformat.from_dict(json.loads(nbformat.writes(nb)))
    for cell in clean.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(clean, work / "notebook.ipynb")
    (root / "guard" / "sitecustomize.py").write_text(_GUARD % GUARD_MESSAGE)
    return Scratch(root, work, root / "reproduced.zarr", home, root / "guard.log",
                   tuple(str(b) for b in banned), tuple(copied))


def _depin_env(scratch: Scratch, cluster: str | None) -> dict[str, str]:
    env = {"DASK_DEPIN__STORE__URL": str(scratch.store), "DASK_DEPIN__STORE__CACHE": "false",
           "DEPIN_REPRODUCE_FORBID": json.dumps(list(scratch.forbidden)),
           "DEPIN_REPRODUCE_GUARD_LOG": str(scratch.guard_log)}
    if cluster:
        env["DASK_DEPIN__SCHEDULER_ADDRESS"] = cluster
    return env


def _pythonpath(scratch: Scratch, inherited: str | None) -> str:
    return os.pathsep.join([str(scratch.root / "guard"), *([inherited] if inherited else [])])


def kernel_env(scratch: Scratch, cluster: str | None, *, minimal: bool) -> dict[str, str]:
    """The environment of the re-execution: the reviewer's (plain mode) or a minimal one (sandbox)."""
    if not minimal:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DEPIN__")}
    else:
        env = {k: os.environ[k] for k in _ENV_PASS if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.setdefault("LANG", "C.UTF-8")
        env.update(HOME=str(scratch.home), TMPDIR=str(scratch.root / "tmp"), PYTHONNOUSERSITE="1",
                   JUPYTER_RUNTIME_DIR=str(scratch.home / "runtime"), IPYTHONDIR=str(scratch.home / "ipython"),
                   MPLCONFIGDIR=str(scratch.home / "matplotlib"), XDG_CONFIG_HOME=str(scratch.home / "config"),
                   XDG_CACHE_HOME=str(scratch.home / "cache"), XDG_DATA_HOME=str(scratch.home / "data"))
    env["PYTHONPATH"] = _pythonpath(scratch, os.environ.get("PYTHONPATH"))
    env.update(_depin_env(scratch, cluster))
    return env


def guard_hits(scratch: Scratch) -> list[dict[str, Any]]:
    """What the guard refused, one record per attempt."""
    try:
        lines = scratch.guard_log.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": "?", "path": line})
    return out


def _bwrap_works() -> tuple[bool, str]:
    if not shutil.which("bwrap"):
        return False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = _bwrap_argv(pathlib.Path(tempfile.gettempdir()), [], network=False, chdir="/")
    try:
        proc = subprocess.run([*probe, sys.executable, "-S", "-c", "pass"], capture_output=True, timeout=30,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bubblewrap failed to start ({exc})"
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        return False, f"bubblewrap does not work here ({why[-1] if why else proc.returncode})"
    return True, "bubblewrap"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _bwrap_argv(scratch: pathlib.Path, protect: Sequence[str], *, network: bool, chdir: str) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-pid",
            "--unshare-ipc", "--unshare-uts"]
    argv += [] if network else ["--unshare-net"]
    argv += ["--cap-drop", "ALL"] if os.geteuid() == 0 else ["--unshare-user"]
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--tmpfs", "/dev/shm", "--proc", "/proc"]
    home = os.path.realpath(os.path.expanduser("~"))
    hidden = [h for h in (*_HIDDEN, home, *protect) if os.path.isdir(h) and not os.path.islink(h) and h != "/"]
    hidden = [h for h in hidden if not any(_under(h, o) for o in hidden if o != h)]
    for h in hidden:
        argv += ["--tmpfs", h]
    # The Python installation and packages the re-execution imports, bound back where a hidden tree holds them.
    paths = sorted({os.path.realpath(p) for p in [*sys.path, sys.prefix, sys.base_prefix,
                                                  os.path.dirname(os.path.realpath(sys.executable))]
                    if p and os.path.exists(p)})
    made: set[str] = set()
    bound: list[str] = []
    for p in paths:
        top = next((h for h in hidden if _under(p, h)), None)
        if top is None or any(_under(p, b) for b in [*bound, *protect]) or _under(p, str(scratch)):
            continue
        parts = os.path.relpath(p, top).split(os.sep)[:-1]
        for i in range(1, len(parts) + 1):
            ancestor = os.path.join(top, *parts[:i])
            if ancestor not in made:
                argv += ["--dir", ancestor]
                made.add(ancestor)
        argv += ["--ro-bind-try", p, p]
        bound.append(p)
    return [*argv, "--bind", str(scratch), str(scratch), "--chdir", chdir, "--"]


def describe(sandbox: bool | str, cluster: str | None) -> dict[str, Any]:
    """How the re-execution is isolated (``sandbox``: False, True/"auto", "bubblewrap" (required) or "child"),
    in words for the report."""
    if not sandbox:
        return {"mode": "plain", "protected": [
            "the published store is not in the working directory and not copied; opening it from Python is "
            "refused and reported (the guard)"],
            "not_protected": ["the notebook runs with your full user rights: it can read and change your files, "
                              "use your credentials and the network (use --sandbox)"]}
    works, why = (False, "not asked for (child process)") if sandbox == "child" else _bwrap_works()
    if sandbox == "bubblewrap" and not works:
        raise RuntimeError(f"a bubblewrap sandbox was required but {why}")
    protected = ["a minimal environment: your tokens, credentials and DASK_* settings are not passed",
                 "HOME and TMPDIR are scratch directories, removed afterwards",
                 "the published store is out of reach of Python code (the guard)"]
    if works:
        protected += ["bubblewrap: the file system is read-only; home directories, /tmp, /run, /mnt, /media and "
                      "the bundle are hidden; only the scratch directory is writable",
                      "no network" if not cluster else "network allowed (for --cluster)",
                      "own PID namespace: it cannot signal your processes"]
        return {"mode": "bubblewrap", "protected": protected, "not_protected": [
            "readable: the rest of the file system outside the hidden directories", "CPU and memory are not limited"]}
    return {"mode": "child process", "why_not_bubblewrap": why, "protected": protected, "not_protected": [
        "without bubblewrap the notebook still runs with your user rights: it can read and change your files "
        "by absolute path and use the network"]}


def execute(nb: Any, scratch: Scratch, *, sandbox: bool | str, cluster: str | None, timeout: float,
            isolation: dict[str, Any]) -> Any:
    """Run the scratch notebook; returns the executed notebook (errors kept as cell outputs)."""
    import nbformat
    from nbclient import NotebookClient

    if not sandbox:
        client = NotebookClient(nbformat.read(scratch.notebook, as_version=4), timeout=timeout, kernel_name="python3",
                                allow_errors=True, resources={"metadata": {"path": str(scratch.work)}})
        client.execute(env=kernel_env(scratch, cluster, minimal=False), cwd=str(scratch.work))
        return client.nb
    out = scratch.root / "executed.ipynb"
    cmd = [sys.executable, "-m", "depin_jupyter.reproduce.isolate", str(scratch.notebook), str(out), str(timeout)]
    if isolation.get("mode") == "bubblewrap":
        cmd = _bwrap_argv(scratch.root, scratch.forbidden, network=bool(cluster), chdir=str(scratch.work)) + cmd
    env = kernel_env(scratch, cluster, minimal=True)
    proc = subprocess.run(cmd, env=env, cwd=str(scratch.work), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False, timeout=timeout * max(1, len(nb.cells)) + 120)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"the sandboxed re-execution failed (exit {proc.returncode}): {' | '.join(tail)}")
    return nbformat.read(out, as_version=4)


def _child(argv: Sequence[str]) -> int:
    """Inside the sandbox: execute the notebook ``argv[0]`` with nbclient and write it to ``argv[1]``."""
    import nbformat
    from nbclient import NotebookClient

    src, dest, timeout = argv[0], argv[1], float(argv[2])
    for d in ("runtime", "ipython", "matplotlib", "config", "cache", "data"):
        os.makedirs(os.path.join(os.environ.get("HOME", "."), d), exist_ok=True)
    client = NotebookClient(nbformat.read(src, as_version=4), timeout=timeout, kernel_name="python3",
                            allow_errors=True, resources={"metadata": {"path": os.getcwd()}})
    client.execute()
    nbformat.write(client.nb, dest)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
