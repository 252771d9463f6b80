"""A lying volunteer, as a Dask worker preload: every float array it returns is off by 1e-3."""


def dask_setup(worker):
    import numpy as np

    from depin_jupyter import relay

    honest = relay.to_payload

    def to_payload(result):
        outputs = result.get("outputs") or {}
        for name, value in list(outputs.items()):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                outputs[name] = value + 1e-3
        return honest(result)

    relay.to_payload = to_payload
