"""Outputs go in and come back out unchanged: numpy, dask (written by workers), xarray, values."""

from __future__ import annotations

import math
import pickle

import dask.array as da
import dask.config
import numpy as np
import pytest
import xarray as xr
import zarr

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.store import UnsupportedOutputError
from depin_jupyter.store.manifest import validate

NUMPY_CASES = {
    "float32_2d": np.arange(600, dtype="f4").reshape(20, 30) / 7,
    "int64": np.arange(-50, 50, dtype="i8"),
    "uint8_3d": np.arange(2 * 3 * 70, dtype="u1").reshape(2, 3, 70),
    "bool": np.arange(33) % 3 == 0,
    "complex": np.exp(1j * np.linspace(0, 3, 40)),
    "float16": np.linspace(-2, 2, 50, dtype="f2"),
    "datetime": np.arange("2020-01-01", "2020-03-01", dtype="datetime64[D]").astype("datetime64[ns]"),
    "timedelta": np.arange(10, dtype="i8").astype("timedelta64[s]"),
    "unicode": np.array(["α", "beta", "", "gamma!"]),
    "bytes": np.array([b"ab", b"", b"xyz"]),
    "object_str": np.array(["x", "yy", "zzz"], dtype=object),
    "structured": np.array([(1, 2.5, b"a"), (3, -1.0, b"bc")], dtype=[("i", "<i4"), ("f", "<f8"), ("s", "S2")]),
    "recarray": np.rec.fromarrays([np.arange(5), np.linspace(0, 1, 5)], names="a,b"),
    "matrix": np.asmatrix(np.arange(6.0).reshape(2, 3)),
    "zero_d": np.array(3.25),
    "empty": np.zeros((0, 4), dtype="f8"),
    "big_endian": np.arange(40, dtype=">i4"),
    "fortran": np.asfortranarray(np.arange(24.0).reshape(4, 6)),
    "nan_inf": np.array([np.nan, np.inf, -np.inf, 0.0, -0.0]),
}


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("case", sorted(NUMPY_CASES))
def test_numpy_roundtrip(store, write_run, small_chunks, case, compression):
    value = NUMPY_CASES[case]
    with dask.config.set({"depin.store.compression": compression}):
        rid = write_run(store, {"x": value})
    eager = store.load(rid, lazy=False)["x"]
    assert type(eager) is type(value)
    assert eager.shape == value.shape
    if value.dtype == object:
        assert eager.dtype == object
    else:
        assert eager.dtype == value.dtype.newbyteorder("=")
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(value))
    rec = store.manifest(rid).outputs["x"]
    assert rec.kind == "array" and rec.shape == value.shape
    assert len(rec.chunk_digests) == math.prod(-(-s // c) for s, c in zip(rec.shape, rec.chunks))
    lazy = store.load(rid)["x"]
    if value.ndim:
        assert isinstance(lazy, da.Array)
        np.testing.assert_array_equal(np.asarray(lazy.compute()), np.asarray(value))
    plain = zarr.open_array(store.url, path=f"runs/{rid}/x", mode="r")[...]  # no depin involved
    np.testing.assert_array_equal(np.asarray(plain, dtype=value.dtype if value.dtype != object else None),
                                  np.asarray(value))


def test_many_chunks_and_every_compression(store, write_run, small_chunks):
    x = np.random.default_rng(1).random((100, 37))
    for compression in ("none", "zstd", "blosc-lz4"):
        with dask.config.set({"depin.store.compression": compression}):
            rid = write_run(store, {"x": x})
        rec = store.manifest(rid).outputs["x"]
        names = [c["name"] for c in rec.codec]
        assert names == {"none": ["bytes"], "zstd": ["bytes", "zstd"], "blosc-lz4": ["bytes", "blosc"]}[compression]
        assert len(rec.chunk_digests) > 20  # 1 KiB chunks of a 29 KiB array
        np.testing.assert_array_equal(store.load(rid, lazy=False)["x"], x)
    assert store.verify().ok


def test_dask_array_is_written_by_the_workers(store, dask_client):
    from distributed import get_task_stream

    base = np.arange(120 * 50, dtype="f8").reshape(120, 50)
    x = da.from_array(base, chunks=(25, 50)).map_blocks(lambda b: b * 2 + 1)
    ragged = da.from_array(np.arange(100), chunks=((10, 30, 60),))  # irregular: rechunked to a grid
    w = store.begin_run(code="x = ...", inputs={}, options={}, cache_key=None)
    lazy_ds = xr.Dataset({"v": ("i", da.arange(100, chunks=25) * 0.5)}, coords={"i": np.arange(100)})
    with get_task_stream(dask_client) as ts:
        w.write_output("x", x)
        w.write_output("ragged", ragged)
        w.write_output("ds", lazy_ds)
    m = w.finish()
    keys = [str(t["key"]) for t in ts.data]
    assert len([k for k in keys if k.startswith(f"depin-write-{w.run_id}-x-")]) == 5  # one task per block
    assert [k for k in keys if k.startswith(f"depin-write-{w.run_id}-ds-hash")]  # hashed on the workers
    assert {t["worker"] for t in ts.data} <= set(dask_client.scheduler_info()["workers"])
    rec = m.outputs["x"]
    assert rec.chunks == (25, 50) and len(rec.chunk_digests) == 5
    out = store.load(w.run_id)
    np.testing.assert_array_equal(out["x"].compute(), base * 2 + 1)
    np.testing.assert_array_equal(out["ragged"].compute(), np.arange(100))
    xr.testing.assert_identical(out["ds"].compute(), lazy_ds.compute())
    assert len(m.outputs["ds"].variables["v"].chunk_digests) == 4
    assert store.verify().ok


def test_xarray_roundtrip_opens_with_plain_xarray_and_zarr(store, write_run):
    ds = xr.Dataset(
        {"temp": (("time", "site"), np.random.default_rng(0).random((6, 3))),
         "label": ("site", np.array(["a", "b", "c"]))},
        coords={"time": np.arange("2021-01-01", "2021-01-07", dtype="datetime64[D]").astype("datetime64[ns]"),
                "site": [10, 20, 30]},
        attrs={"title": "demo", "n": 3},
    )
    arr = xr.DataArray(np.arange(12.0).reshape(3, 4), dims=("y", "x"), coords={"x": [1, 2, 3, 4]},
                       name="heights", attrs={"units": "m"})
    unnamed = xr.DataArray(np.ones(5), dims=("i",))
    lazy_ds = ds.chunk({"time": 2})
    rid = write_run(store, {"ds": ds, "arr": arr, "unnamed": unnamed, "lazy_ds": lazy_ds})
    out = store.load(rid)
    xr.testing.assert_identical(out["ds"].compute(), ds)
    xr.testing.assert_identical(out["arr"].compute(), arr)
    xr.testing.assert_identical(out["unnamed"].compute(), unnamed)
    xr.testing.assert_identical(out["lazy_ds"].compute(), ds)
    xr.testing.assert_identical(store.load(rid, lazy=False)["arr"], arr)
    plain = xr.open_zarr(store.url, group=f"runs/{rid}/ds", consolidated=False)
    xr.testing.assert_identical(plain.compute(), ds)
    temp = zarr.open_group(store.url, mode="r")[f"runs/{rid}/ds/temp"]
    np.testing.assert_array_equal(temp[...], ds["temp"].values)
    assert store.verify().ok


def test_values_live_in_the_manifest(store, write_run):
    values = {
        "i": 7, "f": 2.5, "nan": float("nan"), "b": True, "none": None, "s": "héllo", "raw": b"\x00\xff",
        "c": 1 + 2j, "t": (1, "a", (2.0,)), "l": [1, [2, 3]], "d": {"k": [1, 2], "n": {"x": None}},
        "dk": {1: "one", (2, 3): "pair"}, "set": {1, 2, 3}, "np_f": np.float32(1.5), "np_i": np.int16(-3),
        "np_b": np.bool_(True), "np_dt": np.datetime64("2024-02-29T12:00", "ns"),
    }
    rid = write_run(store, values)
    m = store.manifest(rid)
    assert all(m.outputs[k].kind == "value" for k in values)
    out = store.load(rid)
    for k, v in values.items():
        if k == "nan":
            assert math.isnan(out[k])
        else:
            assert out[k] == v and type(out[k]) is type(v), k
    assert type(out["t"][2]) is tuple and type(out["np_f"]) is np.float32


def test_unsupported_type_names_the_variable(store):
    class Model:
        pass

    w = store.begin_run(code="m = Model()", inputs={}, options={}, cache_key=None)
    with pytest.raises(UnsupportedOutputError, match=r"'model'.*Model"):
        w.write_output("model", Model())
    with pytest.raises(UnsupportedOutputError, match=r"'fn'.*function"):
        w.write_output("fn", lambda: 1)
    with pytest.raises(UnsupportedOutputError, match=r"'masked'.*MaskedArray"):
        w.write_output("masked", np.ma.masked_array([1, 2], mask=[0, 1]))
    with pytest.raises(UnsupportedOutputError, match=r"'mixed'.*numpy.ndarray of dtype object"):
        w.write_output("mixed", np.array([1, "a", None], dtype=object))
    with pytest.raises(DepinUsageError, match="Zarr node"):
        w.write_output("a/b", 1)
    w.write_output("ok", 1)
    with pytest.raises(DepinUsageError, match="already written"):
        w.write_output("ok", 2)


def test_pickle_only_when_allowed(store):
    from fractions import Fraction

    with dask.config.set({"depin.store.allow-pickle": True}):
        w = store.begin_run(code="f = Fraction(1, 3)", inputs={}, options={}, cache_key=None)
    w.write_output("f", Fraction(1, 3))
    m = w.finish()
    assert m.outputs["f"].kind == "pickle" and m.outputs["f"].portable is False
    with pytest.raises(UnsupportedOutputError, match="pickle"):
        store.load(w.run_id)
    assert store.load(w.run_id, allow_pickle=True)["f"] == Fraction(1, 3)
    assert store.verify().ok


def test_manifest_matches_schema_and_writer_pickles(store):
    jsonschema = pytest.importorskip("jsonschema")
    w = store.begin_run(code="x = np.ones(3)", inputs={"np": "module"}, options={"gpu": 1, "tags": ["a"]},
                        cache_key="key-1", name="schema")
    w2 = pickle.loads(pickle.dumps(w))  # what a Dask worker receives
    assert w2.run_id == w.run_id and pickle.dumps(w) == pickle.dumps(w2)
    w2.write_output("x", np.ones(3))
    w2.write_output("ds", xr.Dataset({"v": ("i", np.arange(3))}))
    w2.write_output("n", {"a": 1})
    gpu = {"name": "H100", "memory_bytes": 1, "driver": "1"}
    m = w.finish(worker={"host": "volunteer-7", "cpu": "test", "gpus": [gpu]}, timings={"queue_s": 0.5, "run_s": 1.0})
    doc = m.to_json()
    validate(doc)
    assert doc["worker"]["host"] == "volunteer-7"
    assert doc["environment"]["packages"]["zarr"] == zarr.__version__
    assert doc["timings"]["store_s"] > 0 and doc["code"]["text"] == "x = np.ones(3)"
    broken = {**doc, "outputs": {"x": {**doc["outputs"]["x"], "digest": "not-hex"}}}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    assert store.manifest(w.run_id) == m
