"""A lying volunteer, as a Dask worker preload: every float array it returns is off by 1e-3."""


def dask_setup(worker):
    import numpy as np

    from depin_jupyter.protocol.payloads import from_payload
    from depin_jupyter.worker import relayed as relay
    from depin_jupyter.worker import sandbox

    honest, honest_sandboxed = relay.to_payload, sandbox.run_sandboxed

    def to_payload(result):
        outputs = result.get("outputs") or {}
        for name, value in list(outputs.items()):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                outputs[name] = value + 1e-3
        return honest(result)

    def run_sandboxed(spec, inputs, **kwargs):
        return to_payload(from_payload(honest_sandboxed(spec, inputs, **kwargs)))

    relay.to_payload = to_payload
    sandbox.run_sandboxed = run_sandboxed
