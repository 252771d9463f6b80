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
