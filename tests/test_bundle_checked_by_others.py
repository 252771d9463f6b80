"""A published bundle, checked with tools nobody here wrote: the RO-Crate community's validator (roc-validator) at
REQUIRED and RECOMMENDED severity, and Google's C++ Zarr 3 reader (tensorstore) for every array of the store."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from test_reproduce import _notebook, published  # noqa: F401  (the fixture: a notebook run into a store)

from depin_jupyter.reproduce.publish import STORE_DIR, publish

CONTEXTS = ("https://w3id.org/ro/crate/1.1/context", "https://w3id.org/ro/crate/1.2/context")


@pytest.fixture
def bundle(published, author, tmp_path):  # noqa: F811
    nb_path, store = published
    out = tmp_path / "bundle"
    publish(str(nb_path), str(store), str(out), author_id="https://orcid.org/0000-0002-1825-0097",
            affiliation="Analytical Engine Society", affiliation_url="https://example.org/")
    return out


@pytest.fixture
def offline_validator_cache(tmp_path):
    """roc-validator's own HTTP cache (requests-cache), filled with ro-crate-py's copy of the RO-Crate JSON-LD
    context, so the validator runs in its offline mode: no network, nothing of the validator patched."""
    import requests
    import requests_cache
    import rocrate
    import urllib3

    context = (pathlib.Path(rocrate.__file__).parent / "data" / "ro-crate.jsonld").read_bytes()

    class Local(requests.adapters.BaseAdapter):
        def send(self, request, **kwargs):
            raw = urllib3.HTTPResponse(body=io.BytesIO(context), headers={"Content-Type": "application/ld+json"},
                                       status=200, preload_content=False, request_url=request.url)
            return requests.adapters.HTTPAdapter().build_response(request, raw)

        def close(self):
            pass

    path = tmp_path / "roc-cache"
    session = requests_cache.CachedSession(str(path), expire_after=-1)
    session.mount("https://w3id.org/", Local())
    for url in CONTEXTS:
        assert session.get(url).status_code == 200
    session.close()
    return path


@pytest.mark.parametrize("severity", ["REQUIRED", "RECOMMENDED"])
def test_the_bundle_is_a_valid_process_run_crate(bundle, offline_validator_cache, severity):
    from rocrate_validator import services

    settings = services.ValidationSettings(rocrate_uri=str(bundle), profile_identifier="process-run-crate",
                                           requirement_severity=severity, skip_availability_check=True,
                                           offline=True, cache_path=offline_validator_cache)
    result = services.validate(settings)
    issues = [f"{i.severity.name} {i.check.identifier}: {i.message}" for i in result.get_issues()]
    assert result.passed(), "\n".join(issues)


def test_the_validator_is_not_a_rubber_stamp(bundle, offline_validator_cache):
    # The same check on the same bundle with its license and description removed must fail, naming them.
    from rocrate_validator import services

    crate_file = bundle / "ro-crate-metadata.json"
    crate = json.loads(crate_file.read_text())
    root = next(e for e in crate["@graph"] if e["@id"] == "./")
    del root["license"], root["description"]
    crate_file.write_text(json.dumps(crate))
    result = services.validate(services.ValidationSettings(
        rocrate_uri=str(bundle), profile_identifier="process-run-crate", requirement_severity="REQUIRED",
        skip_availability_check=True, offline=True, cache_path=offline_validator_cache))
    issues = {i.check.identifier: i.message for i in result.get_issues()}
    assert not result.passed() and set(issues) == {"ro-crate-1.1_8.2", "ro-crate-1.1_8.3"}  # RO-Crate 1.1, inherited
    assert "`description`" in issues["ro-crate-1.1_8.2"] and "`license`" in issues["ro-crate-1.1_8.3"]


def test_tensorstore_reads_every_array_like_zarr_python(bundle):
    import tensorstore as ts
    import zarr

    store = bundle / STORE_DIR
    arrays = [p.parent for p in store.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "array"]
    assert arrays
    for path in arrays:
        theirs = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()
        ours = zarr.open_array(str(path), mode="r")
        np.testing.assert_array_equal(theirs.read().result(), ours[...])
