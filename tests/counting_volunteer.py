"""A volunteer worker preload that counts what the worker receives: every frame of every message read from
its connections (after TLS, before decoding), and whether any of the markers in ``DEPIN_COUNT_MARKERS``
(hex, comma-separated) appeared in one. Written to ``DEPIN_COUNT_FILE`` as JSON after each message."""

import json
import os

PATH = os.environ["DEPIN_COUNT_FILE"]
MARKERS = [bytes.fromhex(m) for m in os.environ["DEPIN_COUNT_MARKERS"].split(",") if m]


def dask_setup(worker):
    import distributed.comm.tcp as tcp

    state = {"bytes": 0, "messages": 0, "seen": []}
    original = tcp.from_frames

    async def from_frames(frames, *args, **kwargs):
        for f in frames:
            b = bytes(f)
            state["bytes"] += len(b)
            for m in MARKERS:
                if m.hex() not in state["seen"] and m in b:
                    state["seen"].append(m.hex())
        state["messages"] += 1
        tmp = PATH + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, PATH)
        return await original(frames, *args, **kwargs)

    tcp.from_frames = from_frames
