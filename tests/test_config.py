"""Settings: the shipped defaults match their schema, and Dask's env overrides reach them."""

from __future__ import annotations

import os
import subprocess
import sys

import jsonschema
import yaml

from depin_jupyter import config


def test_defaults_validate_against_the_schema():
    schema = yaml.safe_load(config.SCHEMA_FILE.read_text())
    jsonschema.validate(config.DEFAULTS, schema)


def test_schema_rejects_a_bad_value():
    schema = yaml.safe_load(config.SCHEMA_FILE.read_text())
    bad = {"depin": {**config.DEFAULTS["depin"], "gpu-fallback": "maybe"}}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError as e:
        assert "maybe" in str(e)
    else:
        raise AssertionError("schema accepted gpu-fallback: maybe")


def test_every_default_is_in_the_schema():
    schema = yaml.safe_load(config.SCHEMA_FILE.read_text())

    def walk(d, s, path):
        for k, v in d.items():
            assert k in s["properties"], f"{path}{k} missing from depin-schema.yaml"
            if isinstance(v, dict) and s["properties"][k].get("properties"):
                walk(v, s["properties"][k], f"{path}{k}.")

    walk(config.DEFAULTS, schema, "")


def test_environment_variables_override_defaults():
    env = dict(os.environ, DASK_DEPIN__TIMEOUT="12", DASK_DEPIN__LOCAL_CLUSTER__N_WORKERS="3")
    out = subprocess.run(
        [sys.executable, "-c", "from depin_jupyter import config; "
                               "print(config.seconds('timeout'), config.get('local-cluster.n-workers'))"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["12.0", "3"]


def test_option_beats_config_and_durations_parse():
    import dask

    with dask.config.set({"depin.timeout": "2 minutes"}):
        assert config.seconds("timeout") == 120
        assert config.seconds("timeout", 5) == 5
    assert config.nbytes("input-cache-bytes") == 4 * 2**30


def test_package_import_is_cheap():
    code = "import sys, depin_jupyter; print(any(m in sys.modules for m in ('dask', 'distributed', 'zarr')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _check_in_a_fresh_process(**env_vars: str) -> str:
    """`config.check()` in a new process with ``env_vars`` set: what it says (or "ok")."""
    code = ("from depin_jupyter import config\ntry:\n    config.check()\n    print('ok')\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DEPIN")}
    return subprocess.run([sys.executable, "-c", code], env={**env, **env_vars}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_misspelt_environment_setting_is_an_error_naming_the_right_spelling():
    said = _check_in_a_fresh_process(DASK_DEPIN__STORE="/data/x.zarr")  # Dask alone would ignore it silently
    assert said.startswith("DepinConfigError") and "(from environment variable DASK_DEPIN__STORE)" in said
    assert "depin.store is a group of settings" in said and "DASK_DEPIN__STORE__URL=/data/x.zarr" in said
    said = _check_in_a_fresh_process(DASK_DEPIN__STORE__LAZYBYTES="1GiB")
    assert "unknown setting depin.store.lazybytes" in said and "DASK_DEPIN__STORE__LAZY_BYTES" in said
    said = _check_in_a_fresh_process(DASK_DEPIN__TIMOUT="60")
    assert "did you mean depin.timeout (DASK_DEPIN__TIMEOUT)" in said
    said = _check_in_a_fresh_process(DASK_DEPIN__STORE__CACHE="maybe")
    assert "depin.store.cache" in said and "boolean" in said and "DASK_DEPIN__STORE__CACHE" in said
    assert _check_in_a_fresh_process(DASK_DEPIN__STORE__URL="/data/x.zarr", DASK_DEPIN__LOCAL_CLUSTER__N_WORKERS="3") == "ok"


def test_a_mistyped_setting_in_dask_config_is_an_error(tmp_path):
    import dask

    from depin_jupyter.errors import DepinConfigError

    config.check()
    with dask.config.set({"depin.store.compression": "lz5"}):
        try:
            config.check()
        except DepinConfigError as e:
            assert "depin.store.compression" in str(e) and "zstd" in str(e)
        else:
            raise AssertionError("compression: lz5 was accepted")
    (tmp_path / "depin.yaml").write_text("depin:\n  replicas-maxx: 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DEPIN")}
    said = subprocess.run([sys.executable, "-c", "from depin_jupyter import config\ntry:\n    config.check()\n"
                           "except Exception as e:\n    print(e)"], env={**env, "DASK_CONFIG": str(tmp_path)},
                          capture_output=True, text=True, check=True).stdout
    assert "unknown setting depin.replicas-maxx" in said and str(tmp_path) in said and "replicas-max" in said


def test_the_checker_knows_every_keyword_the_schema_uses_and_agrees_with_jsonschema():
    schema = yaml.safe_load(config.SCHEMA_FILE.read_text())

    def keywords(node):
        for k, v in node.items():
            if k == "properties":
                for sub in v.values():
                    yield from keywords(sub)
                continue
            yield k
            if isinstance(v, dict):
                yield from keywords(v)
            if k == "oneOf":
                for sub in v:
                    yield from keywords(sub)

    assert set(keywords(schema)) <= config.SCHEMA_KEYWORDS
    leaf = schema["properties"]["depin"]["properties"]
    samples = {"pool": ["lab", "bad/pool", None, 3], "retries": [0, -1, 2.5, True], "rtol": [0.1, -1, "x"],
               "gpu-fallback": ["cpu", "maybe"], "trusted-pools": [["lab"], [1], "lab"]}
    for key, values in samples.items():
        for value in values:
            ours = config._first_error(leaf[key], value) is None
            theirs = jsonschema.Draft202012Validator(leaf[key]).is_valid(value)
            assert ours == theirs, (key, value)
