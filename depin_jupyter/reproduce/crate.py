"""The RO-Crate of a bundle: RO-Crate 1.1 metadata conforming to the Process Run Crate 0.5 profile.

What depin records is a set of process runs: each `%%depin` cell's execution, with its code, input content hashes,
stored outputs and hardware. The cell's code was executed by a Python interpreter (the action's instrument, a
SoftwareApplication with the absolute python.org id the profile recommends); the cell itself is the action's
first object. The notebook as a whole never ran as one recorded execution, so the Workflow / Provenance Run
Crate profiles (a workflow run with steps) would claim more than the store holds. The signing key and the
store's anchor (ledger head, run-digest Merkle root) are recorded as PropertyValues; the signature over them
and this file is the detached ``depin-signature.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Authorship", "CrateRun", "PROCESS_CRATE", "RO_CRATE", "build_crate", "license_id"]

PROCESS_CRATE = "https://w3id.org/ro/wfrun/process/0.5"
RO_CRATE = "https://w3id.org/ro/crate/1.1"
CONTEXT = "https://w3id.org/ro/crate/1.1/context"


@dataclass(frozen=True)
class Authorship:
    """Who publishes: what RO-Crate asks of the root (license, author, publisher) and the signing key."""

    license: str
    author: str | None = None
    author_id: str | None = None
    affiliation: str | None = None
    affiliation_url: str | None = None
    publisher: str | None = None
    publisher_url: str | None = None
    key_b64: str | None = None
    key_fingerprint: str | None = None

    def missing_recommended(self) -> list[str]:
        """What a complete (RECOMMENDED-level) crate still lacks, as the flags that would add it."""
        out = [] if self.author else ["--author"]
        out += [] if self.affiliation else ["--affiliation"]
        out += [] if (self.affiliation_url or self.publisher_url) else ["--affiliation-url"]
        return out


@dataclass(frozen=True)
class CrateRun:
    """One `%%depin` cell of the notebook and its published run (None: no complete run)."""

    index: int
    name: str | None
    code: str
    manifest: Any = None  # RunManifest, or None: no complete run
    sealed_at: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)


def license_id(value: str) -> str:
    """A license URL: an SPDX id becomes its spdx.org page."""
    return value if "://" in value else f"https://spdx.org/licenses/{value}"


def iso(stamp: str | None) -> str | None:
    """A depin timestamp as the profile's ISO 8601 form (milliseconds, explicit UTC offset)."""
    if not stamp:
        return None
    t = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}+00:00"


def _ref(ids: Sequence[str]) -> Any:
    """A reference or a list of references (RO-Crate 1.1 prefers a single value to a one-item list)."""
    refs = [{"@id": i} for i in ids]
    return refs[0] if len(refs) == 1 else refs


def _people(who: Authorship) -> list[dict[str, Any]]:
    """The license, author, affiliation, publisher and key entities; ids are fixed by `_ids`."""
    ids = _ids(who)
    graph: list[dict[str, Any]] = [{"@id": ids["license"], "@type": "CreativeWork", "name": who.license,
                                    "description": f"the license of this bundle ({who.license})"}]
    if who.author:
        person: dict[str, Any] = {"@id": ids["author"], "@type": "Person", "name": who.author}
        if who.affiliation:
            person["affiliation"] = {"@id": ids["affiliation"]}
        if who.key_b64:
            person["identifier"] = {"@id": "#signing-key"}
        graph.append(person)
    for role in ("affiliation", "publisher"):
        name = who.affiliation if role == "affiliation" else (who.publisher or who.affiliation)
        url = who.affiliation_url if role == "affiliation" else (who.publisher_url or who.affiliation_url)
        if name and not any(e["@id"] == ids[role] for e in graph):
            graph.append({"@id": ids[role], "@type": "Organization", "name": name, **({"url": url} if url else {})})
    if who.key_b64:
        graph.append({"@id": "#signing-key", "@type": "PropertyValue", "name": "Ed25519 public signing key",
                      "propertyID": "ed25519-public-key", "value": who.key_b64, "identifier": who.key_fingerprint,
                      "description": f"the key that signed depin-signature.json; fingerprint {who.key_fingerprint}"})
    return graph


def _ids(who: Authorship) -> dict[str, str]:
    org = who.affiliation_url or (f"#org-{who.affiliation}".replace(" ", "-") if who.affiliation else "#org")
    pub = who.publisher_url or (f"#org-{who.publisher}".replace(" ", "-") if who.publisher else org)
    return {"license": license_id(who.license), "author": who.author_id or "#author", "affiliation": org,
            "publisher": pub}


def _python(version: str) -> dict[str, Any]:
    release = "".join(version.split(".")[:3])
    return {"@id": f"https://www.python.org/downloads/release/python-{release}/", "@type": "SoftwareApplication",
            "name": "Python", "version": version, "url": "https://www.python.org/"}


def _outputs(run: CrateRun, store_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Entities for a run's outputs: arrays as datasets in the store, small values as PropertyValues."""
    entities, ids = [], []
    m = run.manifest
    for name, rec in m.outputs.items():
        if rec.path:
            e: dict[str, Any] = {"@id": f"{store_dir}/{rec.path}/", "@type": "Dataset", "name": name}
            if rec.shape is not None:
                e["description"] = f"{rec.dtype} array of shape {tuple(rec.shape)} ({rec.kind}, Zarr 3)"
            else:
                e["description"] = f"{rec.kind} output stored in Zarr 3"
        else:
            e = {"@id": f"#run-{m.run_id}-{name}", "@type": "PropertyValue", "name": name,
                 "value": json.dumps(rec.value, default=str)[:1000]}
        if rec.digest:  # "<algorithm>:<hex>"; a bare hex digest (older stores) is SHA-256
            algorithm, _, hexdigest = rec.digest.rpartition(":")
            if algorithm in ("", "sha256"):
                e["sha256"] = hexdigest
            else:  # RO-Crate's context knows sha256 only: other digests are named by their identifier
                e["identifier"] = rec.digest
        entities.append(e)
        ids.append(e["@id"])
    return entities, ids


def _hardware(worker: Mapping[str, Any]) -> str:
    gpu = worker.get("gpu") if isinstance(worker.get("gpu"), dict) else None
    gpus = worker.get("gpus") if isinstance(worker.get("gpus"), list) else []
    gpu = gpu or (gpus[0] if gpus and isinstance(gpus[0], dict) else None)
    cpu = worker.get("cpu") or worker.get("machine") or "unknown CPU"
    return f"GPU {gpu.get('name')} with CPU {cpu}" if gpu and gpu.get("name") else f"CPU {cpu}"


def _action(run: CrateRun, nb_name: str, author_id: str | None, store_dir: str) -> list[dict[str, Any]]:
    """The CreateAction of one run, with its cell, inputs, outputs and interpreter."""
    from depin_jupyter.version import __version__

    m = run.manifest
    python = _python(str((m.environment or {}).get("python") or platform.python_version()))
    cell_id = f"#cell-{run.index}"
    inputs = [{"@id": f"#input-{m.run_id}-{k}", "@type": "PropertyValue", "name": k, "value": str(v),
               "description": "content hash of the input the cell read"} for k, v in m.inputs.items()]
    outputs, result_ids = _outputs(run, store_dir)
    worker = dict(m.worker or {})
    action: dict[str, Any] = {
        "@id": f"#run-{m.run_id}", "@type": "CreateAction", "name": f"depin run {m.run_id}",
        "identifier": m.run_id, "instrument": {"@id": python["@id"]},
        "object": _ref([cell_id, *[i["@id"] for i in inputs]]),
        "description": (f"cell {run.index} of {nb_name} ({run.name or 'unnamed'}) executed by depin-jupyter "
                        f"{__version__} on {_hardware(worker)} (worker {worker.get('name') or worker.get('address')})"),
        "startTime": iso(m.created), "endTime": iso(run.sealed_at or m.created),
        "actionStatus": ("http://schema.org/CompletedActionStatus" if m.status == "ok"
                         else "http://schema.org/FailedActionStatus"),
    }
    if result_ids:
        action["result"] = _ref(result_ids)
    if author_id:
        action["agent"] = {"@id": author_id}
    if m.status != "ok" and (m.extra or {}).get("error"):
        err = m.extra["error"]
        action["error"] = f"{err.get('type')}: {err.get('message')}"
    return [action, python, *inputs, *outputs]


def build_crate(nb_name: str, runs: Sequence[CrateRun], who: Authorship, *, store_dir: str, lock_file: str,
                signature_file: str | None, files: Mapping[str, str], anchor: Mapping[str, Any]) -> dict[str, Any]:
    """The crate as JSON: ``files`` are the bundle's files (name -> SHA-256), ``anchor`` the store's anchor."""
    ids = _ids(who)
    author_id = ids["author"] if who.author else None
    parts = [nb_name, f"{store_dir}/", lock_file, *sorted(set(files) - {nb_name, lock_file})]
    parts += [signature_file] if signature_file else []
    root: dict[str, Any] = {
        "@id": "./", "@type": "Dataset", "name": f"{nb_name} with its depin results",
        "description": (f"The notebook {nb_name}, the Zarr 3 result store of its %%depin cells' runs (with the "
                        "hash-chained ledger that seals them), the exact package versions, and one CreateAction "
                        "per run (Process Run Crate)."),
        "datePublished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "license": {"@id": ids["license"]}, "conformsTo": {"@id": PROCESS_CRATE}, "hasPart": _ref(parts)}
    if author_id:
        root["author"] = {"@id": author_id}
    if who.publisher or who.affiliation:
        root["publisher"] = {"@id": ids["publisher"]}
    graph: list[dict[str, Any]] = [
        {"@id": "ro-crate-metadata.json", "@type": "CreativeWork", "about": {"@id": "./"},
         "conformsTo": {"@id": RO_CRATE}},
        root,
        {"@id": PROCESS_CRATE, "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"},
        *_people(who), *_files(nb_name, lock_file, signature_file, files),
        *_store(store_dir, anchor)]
    actions: list[str] = []
    for run in runs:
        graph.append({"@id": f"#cell-{run.index}", "@type": "CreativeWork", "name": run.name or f"cell {run.index}",
                      "description": f"the code of %%depin cell {run.index} of {nb_name}", "text": run.code,
                      "encodingFormat": "text/x-python", "isPartOf": {"@id": nb_name}})
        if run.manifest is None:
            continue
        entities = _action(run, nb_name, author_id, store_dir)
        actions.append(entities[0]["@id"])
        graph += [e for e in entities if all(g["@id"] != e["@id"] for g in graph)]
    if actions:
        root["mentions"] = _ref(actions)
    store_entity = next(e for e in graph if e["@id"] == f"{store_dir}/")
    arrays = [e["@id"] for e in graph if e["@type"] == "Dataset" and e["@id"].startswith(f"{store_dir}/runs/")]
    if arrays:
        store_entity["hasPart"] = _ref(arrays)
    return {"@context": CONTEXT, "@graph": graph}


def _files(nb_name: str, lock_file: str, signature_file: str | None,
           files: Mapping[str, str]) -> list[dict[str, Any]]:
    import mimetypes

    out = []
    for name, digest in sorted(files.items()):
        if name == nb_name:
            kind, desc = "application/x-ipynb+json", "the notebook as published (Jupyter, Python)"
        elif name == lock_file:
            kind, desc = "text/plain", "exact Python and package versions of the publishing environment"
        elif name == "README.md":
            kind, desc = "text/markdown", "whose claim this is (the signing key), what is pinned, how to check it"
        else:
            kind, desc = mimetypes.guess_type(name)[0] or "application/octet-stream", "a file the notebook reads"
        out.append({"@id": name, "@type": "File", "name": name, "description": desc, "encodingFormat": kind,
                    "sha256": digest, **({"about": {"@id": "./"}} if name == "README.md" else {})})
    if signature_file:
        out.append({"@id": signature_file, "@type": "File", "name": signature_file, "encodingFormat": "application/json",
                    "description": ("Ed25519 signature by #signing-key over the ledger head, the run digests' Merkle "
                                    "root, the store's files and the SHA-256 of this metadata file and of the files "
                                    "above (check with `depin verify` on the bundle)")})
    return out


def _store(store_dir: str, anchor: Mapping[str, Any]) -> list[dict[str, Any]]:
    props = [("#ledger-head", "ledger head (SHA-256 of the newest entry)", anchor.get("head_sha256")),
             ("#ledger-entries", "ledger entries", anchor.get("ledger_entries")),
             ("#runs-merkle-root", "Merkle root of the run digests (RFC 6962)", anchor.get("runs_merkle_root"))]
    store = {"@id": f"{store_dir}/", "@type": "Dataset", "name": "depin result store (Zarr 3, with ledger)",
             "description": "every %%depin run: outputs chunked with per-chunk digests (BLAKE3, or SHA-256 in "
                            "older stores), manifests, and the "
                            "ledger; `depin verify` re-hashes it", "encodingFormat": "application/vnd+zarr",
             "additionalProperty": _ref([p[0] for p in props])}
    return [store, *[{"@id": i, "@type": "PropertyValue", "name": n, "value": str(v)} for i, n, v in props]]
