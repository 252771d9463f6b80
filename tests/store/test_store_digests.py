"""Digests name their algorithm: old bare-hex SHA-256 runs, new BLAKE3 and SHA-256 runs verify side by side;
a flipped byte in a BLAKE3 chunk is found and located; verifying reads refuse bytes changed after sealing."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import shutil

import blake3
import dask.config
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from depin_jupyter.cli import main
from depin_jupyter.errors import DepinUsageError
from depin_jupyter.store import StoreIntegrityError, open_store
from depin_jupyter.store._digest import (
    PIECE_BYTES,
    algorithm_of,
    digest,
    digest_like,
    matches,
    output_digest,
    output_digest_like,
)
from depin_jupyter.store.manifest import validate

OLD_STORE = pathlib.Path(__file__).with_name("data") / "sha256-store.zarr"
"""Written by depin-jupyter before #22 (bare-hex SHA-256, manifest schema 1); see data/make_sha256_store.py."""

OLD_X = np.arange(1000, dtype="f4").reshape(50, 20)


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((40, 25))


def _ds(seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    return xr.Dataset({"v": (("t",), rng.random(300))}, coords={"t": np.arange(300)})


@pytest.fixture
def mixed(tmp_path, write_run, small_chunks):
    """A copy of the old store plus a new BLAKE3 run and a new SHA-256 run: (store, {label: run id})."""
    url = tmp_path / "mixed.zarr"
    shutil.copytree(OLD_STORE, url)
    rs = open_store(str(url), create=False)
    runs = {s.name: s.run_id for s in rs.runs()}
    assert set(runs) == {"old-none", "old-zstd"}
    with dask.config.set({"depin.store.compression": "none"}):
        runs["blake3"] = write_run(rs, {"x": _x(1), "ds": _ds(1), "n": 7}, name="blake3")
        with dask.config.set({"depin.store.digest": "sha256"}):
            runs["sha256"] = write_run(rs, {"x": _x(2), "ds": _ds(2)}, name="sha256")
    return rs, runs


def _chunk(rs, run_id: str, array: str, index: int = 1) -> str:
    files = sorted(p for p in glob.glob(os.path.join(rs.url, "runs", run_id, array, "c", "**"), recursive=True)
                   if os.path.isfile(p))
    return files[index]


def _flip(path: str, pos: int | None = None) -> None:
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2 if pos is None else pos] ^= 0x5A
    pathlib.Path(path).write_bytes(bytes(data))


def test_digest_rules_name_their_algorithm():
    assert digest(b"abc") == "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert digest(b"abc", "sha256") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    bare = hashlib.sha256(b"abc").hexdigest()
    assert algorithm_of(bare) == "sha256" and digest_like(b"abc", bare) == bare  # old stores: bare hex
    assert digest_like(b"abc", digest(b"abc")) == digest(b"abc") and not matches(b"abd", digest(b"abc"))
    arr = np.arange(10, dtype="f4")
    assert digest(arr) == digest(arr.tobytes()) == digest((arr[:3], arr[3:].tobytes()))
    assert not matches(b"abc", "md5:" + "0" * 64) and not matches(b"abc", "blake3:xyz")
    with pytest.raises(ValueError):
        algorithm_of("blake3:" + "0" * 63)
    chunks = {"c/1": digest(b"b"), "c/0": digest(b"a")}
    assert output_digest_like(chunks, output_digest(chunks)) == output_digest(chunks)
    old = {"c/0": bare}  # the pre-#22 rule: bare sha256 of the "<key> <digest>\n" lines
    assert output_digest_like(old, "0" * 64) == hashlib.sha256(f"c/0 {bare}\n".encode()).hexdigest()


def test_old_sha256_and_new_blake3_runs_verify_together(mixed):
    rs, runs = mixed
    old = rs.manifest(runs["old-none"])
    assert old.schema_version == 1 and old.digest_algorithm == "sha256"
    assert all(":" not in d for d in old.outputs["x"].chunk_digests.values())
    new = rs.manifest(runs["blake3"])
    assert new.to_json()["digests"]["algorithm"] == "blake3" and new.schema_version == 2
    for rec in (new.outputs["x"], new.outputs["ds"].variables["v"]):
        assert rec.digest.startswith("blake3:") and all(d.startswith("blake3:") for d in rec.chunk_digests.values())
    assert new.outputs["ds"].digest.startswith("blake3:") and new.outputs["n"].digest.startswith("blake3:")
    sha = rs.manifest(runs["sha256"])
    assert sha.outputs["x"].digest.startswith("sha256:") and sha.to_json()["digests"]["algorithm"] == "sha256"
    for m in (new, sha):
        validate(m.to_json())
    validate(json.loads((OLD_STORE / "runs" / runs["old-none"] / "zarr.json").read_text())["attributes"]
             ["depin_manifest"])

    res = CliRunner().invoke(main, ["verify", rs.url])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "OK" and "4 complete runs" in res.output
    for label in ("old-none", "old-zstd"):  # old runs still load, verified
        out = rs.load(runs[label], lazy=False, verify=True)
        np.testing.assert_array_equal(out["x"], OLD_X)
        assert out["meta"] == {"answer": 42} and out["ds"]["v"].shape == (300,)
    np.testing.assert_array_equal(rs.load(runs["blake3"], lazy=False, verify=True)["x"], _x(1))
    np.testing.assert_array_equal(rs.load(runs["sha256"], verify=True)["x"].compute(), _x(2))


def test_a_flipped_byte_in_a_blake3_chunk_is_found_and_located(mixed):
    rs, runs = mixed
    rid = runs["blake3"]
    chunk = _chunk(rs, rid, "x")
    key = "c/" + os.path.relpath(chunk, os.path.join(rs.url, "runs", rid, "x", "c")).replace(os.sep, "/")
    assert rs.manifest(rid).outputs["x"].chunk_digests[key].startswith("blake3:")
    _flip(chunk)
    report = rs.verify()
    assert [(p.run_id, p.output, p.array, p.chunk) for p in report.problems] == [(rid, "x", "x", key)]
    res = CliRunner().invoke(main, ["verify", rs.url])
    assert res.exit_code == 1
    assert f"MISMATCH run {rid} / output x / chunk {key}: chunk bytes differ from their digest" in res.output

    _flip(chunk)  # undone; now a chunk of an xarray variable and one of the old SHA-256 run
    _flip(_chunk(rs, rid, "ds/v", 2))
    _flip(_chunk(rs, runs["old-zstd"], "x", 0))
    res = CliRunner().invoke(main, ["verify", rs.url])
    assert res.exit_code == 1 and "FAILED: 2 problem(s)" in res.output
    assert f"MISMATCH run {rid} / output ds / array ds/v / chunk c/2: chunk bytes differ" in res.output
    assert f"MISMATCH run {runs['old-zstd']} / output x / chunk c/0/0: chunk bytes differ" in res.output


@pytest.mark.parametrize("compression", ["none", "zstd"])  # none: chunk files read straight into the array
def test_a_verifying_read_detects_a_flipped_byte(tmp_path, write_run, small_chunks, compression):
    rs = open_store(str(tmp_path / "r.zarr"))
    with dask.config.set({"depin.store.compression": compression}):
        rid = write_run(rs, {"x": _x(3), "ds": _ds(3)})
    np.testing.assert_array_equal(rs.load(rid, lazy=False, verify=True)["x"], _x(3))
    chunk = _chunk(rs, rid, "x", 2)
    key = "c/" + os.path.relpath(chunk, os.path.join(rs.url, "runs", rid, "x", "c")).replace(os.sep, "/")
    _flip(chunk, 0 if compression == "none" else None)
    where = f"run {rid} / output x / chunk {key}: bytes differ from their digest"
    with pytest.raises(StoreIntegrityError, match=where):
        rs.load(rid, ["x"], lazy=False, verify=True)
    lazy = rs.load(rid, ["x"], verify=True)["x"]  # nothing read yet: the chunk is checked when computed
    with pytest.raises(StoreIntegrityError, match=where):
        lazy.compute()
    if compression == "none":  # the reason to verify: an unverified read returns the changed value
        assert not np.array_equal(rs.load(rid, ["x"], lazy=False, verify=False)["x"], _x(3))
    _flip(_chunk(rs, rid, "ds/v", 1))
    with pytest.raises(StoreIntegrityError, match=f"run {rid} / output ds / array ds/v / chunk c/1"):
        rs.load(rid, ["ds"], lazy=False, verify=True)


def test_a_verifying_read_of_an_old_sha256_run_detects_a_flipped_byte(mixed):
    rs, runs = mixed
    rid = runs["old-none"]
    _flip(_chunk(rs, rid, "x", 3), 0)
    with pytest.raises(StoreIntegrityError, match=f"run {rid} / output x / chunk c/3/0: bytes differ"):
        rs.load(rid, lazy=False, verify=True)


def test_a_verifying_read_refuses_missing_chunks_and_changed_metadata(tmp_path, write_run, small_chunks):
    rs = open_store(str(tmp_path / "m.zarr"))
    with dask.config.set({"depin.store.compression": "zstd"}):
        rid = write_run(rs, {"x": _x(4)})
    os.remove(_chunk(rs, rid, "x", 1))  # unverified, zarr would fill the hole with the fill value
    with pytest.raises(StoreIntegrityError, match=f"run {rid} / output x / chunk c/1/0: missing"):
        rs.load(rid, lazy=False, verify=True)
    meta = pathlib.Path(rs.url, "runs", rid, "x", "zarr.json")
    meta.write_text(meta.read_text().replace('"fill_value": 0.0', '"fill_value": 1.0'))
    with pytest.raises(StoreIntegrityError, match=rf"run {rid} / output x / metadata \(zarr.json\): bytes differ"):
        rs.load(rid, lazy=False, verify=True)


def test_verify_on_read_setting_covers_cache_hits(tmp_path, write_run, small_chunks):
    rs = open_store(str(tmp_path / "c.zarr"))
    with dask.config.set({"depin.store.compression": "none"}):
        rid = write_run(rs, {"x": _x(5)}, cache_key="key")
    _flip(_chunk(rs, rid, "x", 0))
    assert rs.lookup_cache("key") == rid  # the lookup reads no chunks, so its cost does not grow
    with dask.config.set({"depin.store.verify-on-read": True}):
        hit = rs.load(rid)["x"]  # what a cache hit binds: lazy, checked chunk by chunk when used
        with pytest.raises(StoreIntegrityError, match=f"run {rid} / output x / chunk c/0/0"):
            hit.compute()
    assert not np.array_equal(rs.load(rid)["x"].compute(), _x(5))  # off by default: served as changed


def test_an_unknown_digest_setting_fails_before_the_run_begins(store):
    with dask.config.set({"depin.store.digest": "md5"}), pytest.raises(DepinUsageError, match="store.digest"):
        store.begin_run(code="x = 1", inputs={}, options={}, cache_key=None)


def test_a_verifying_lazy_read_computed_on_cluster_workers_detects_a_flipped_byte(tmp_path, write_run, small_chunks,
                                                                                   dask_client):
    rs = open_store(str(tmp_path / "d.zarr"))
    rid = write_run(rs, {"x": _x(6)}, cache_key="key")
    lazy = rs.load(rid, verify=True)["x"]
    np.testing.assert_array_equal(dask_client.compute(lazy).result(), _x(6))  # the check travels to the workers
    _flip(_chunk(rs, rid, "x", 3))
    with pytest.raises(StoreIntegrityError, match=f"run {rid} / output x / chunk c/3/0: bytes differ"):
        dask_client.compute(rs.load(rid, verify=True)["x"]).result()


@pytest.fixture
def multi_piece_run(store, write_run):
    """A run whose chunks are several `PIECE_BYTES` pieces long (hashed and copied piece by piece) and
    whose last chunk is shorter than the others."""
    x = np.random.default_rng(3).random((2 * PIECE_BYTES + 12345) // 4 * 3, dtype=np.float32)
    with dask.config.set({"depin.store.chunk-bytes": 2 * PIECE_BYTES + 4096, "depin.store.compression": "none"}):
        return store, write_run(store, {"x": x}), x


def test_chunks_hashed_on_the_way_to_disk_match_their_bytes(multi_piece_run):
    rs, rid, x = multi_piece_run
    digests = rs.manifest(rid).outputs["x"].chunk_digests
    base = os.path.join(rs.url, "runs", rid, "x")
    assert len(digests) == 4
    for key, recorded in digests.items():  # what the manifest says is what is on disk, hashed afresh
        data = pathlib.Path(base, *key.split("/")).read_bytes()
        assert recorded == "blake3:" + blake3.blake3(data).hexdigest()
    assert not glob.glob(os.path.join(base, "**", "*.partial"), recursive=True)
    np.testing.assert_array_equal(rs.load(rid, lazy=False, verify=True)["x"], x)


@pytest.mark.parametrize("pos", [0, PIECE_BYTES + 7, -1])
def test_a_verifying_read_finds_a_flipped_byte_in_any_piece_of_a_chunk(multi_piece_run, pos):
    rs, rid, _ = multi_piece_run
    chunk = _chunk(rs, rid, "x", 1)
    _flip(chunk, pos if pos >= 0 else os.path.getsize(chunk) - 1)
    with pytest.raises(StoreIntegrityError, match=rf"run {rid} / output x / chunk c/1: bytes differ"):
        rs.load(rid, lazy=False, verify=True)
    last = _chunk(rs, rid, "x", 3)  # the short last chunk, flipped where no piece boundary falls
    _flip(chunk, pos if pos >= 0 else os.path.getsize(chunk) - 1)
    _flip(last, os.path.getsize(last) - 3)
    with pytest.raises(StoreIntegrityError, match=rf"run {rid} / output x / chunk c/3: bytes differ"):
        rs.load(rid, lazy=False, verify=True)


def test_depin_load_verify_names_the_changed_chunk_and_saves_what_is_intact(multi_piece_run, tmp_path):
    rs, rid, x = multi_piece_run
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["load", rid[:-3], "--store", rs.url, "--verify", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"x: numpy.ndarray shape=({x.size},) dtype=float32 -> {out / 'x.npy'}" in res.output
    assert res.output.splitlines()[-1] == f"verified: every chunk read matched its digest in run {rid}"
    np.testing.assert_array_equal(np.load(out / "x.npy"), x)

    _flip(_chunk(rs, rid, "x", 2))
    res = CliRunner().invoke(main, ["load", rid, "--store", rs.url, "--verify"])
    assert res.exit_code == 1
    assert f"run {rid} / output x / chunk c/2: bytes differ from their digest" in res.output
    res = CliRunner().invoke(main, ["load", rid, "--store", rs.url, "--no-verify"])  # asked not to check
    assert res.exit_code == 0 and "verified" not in res.output
    res = CliRunner().invoke(main, ["load", rid, "nope", "--store", rs.url])
    assert res.exit_code == 2 and "has no output(s) ['nope']" in res.output
