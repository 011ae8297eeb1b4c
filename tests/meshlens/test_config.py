"""Settings from flags, MESHLENS_* environment, a YAML file and defaults, and the errors naming where a bad one came from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meshlens.collector.config import MAX_BODY_BYTES, CollectorConfig
from meshlens.config import ConfigError, resolve


@dataclass
class Settings:
    name: str = "default-name"
    port: int = 1
    ratio: float = 0.5
    verbose: bool = False

    def validate(self) -> None:
        if self.port > 60_000:
            raise ValueError(f"port must be at most 60000, got {self.port}")


def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


NO_FLAGS = {"name": None, "port": None, "ratio": None, "verbose": None}


# -- precedence ------------------------------------------------------------------


def test_defaults_when_nothing_is_given() -> None:
    assert resolve(Settings, NO_FLAGS, env={}) == Settings()


@pytest.mark.parametrize("flag, env, file, expected", [
    # (flag, MESHLENS_* env, file, what wins), for each of str, int and float
    ({"name": "from-flag"}, {"MESHLENS_NAME": "from-env"}, "name: from-file", Settings(name="from-flag")),
    ({}, {"MESHLENS_NAME": "from-env"}, "name: from-file", Settings(name="from-env")),
    ({}, {}, "name: from-file", Settings(name="from-file")),
    ({"port": 10}, {"MESHLENS_PORT": "20"}, "port: 30", Settings(port=10)),
    ({}, {"MESHLENS_PORT": "20"}, "port: 30", Settings(port=20)),
    ({}, {}, "port: 30", Settings(port=30)),
    ({"ratio": 0.1}, {"MESHLENS_RATIO": "0.2"}, "ratio: 0.3", Settings(ratio=0.1)),
    ({}, {"MESHLENS_RATIO": "0.2"}, "ratio: 0.3", Settings(ratio=0.2)),
    ({}, {}, "ratio: 0.3", Settings(ratio=0.3)),
    ({"verbose": True}, {"MESHLENS_VERBOSE": "no"}, "verbose: false", Settings(verbose=True)),
    ({}, {"MESHLENS_VERBOSE": "yes"}, "verbose: false", Settings(verbose=True)),
    ({}, {}, "verbose: on", Settings(verbose=True)),
])
def test_flag_beats_env_beats_file_beats_default(tmp_path: Path, flag: dict, env: dict, file: str,
                                                 expected: Settings) -> None:
    assert resolve(Settings, {**NO_FLAGS, **flag}, env=env, config_file=write(tmp_path, file)) == expected


def test_each_setting_resolves_on_its_own(tmp_path: Path) -> None:
    got = resolve(Settings, {**NO_FLAGS, "name": "flag"}, env={"MESHLENS_PORT": "2"},
                  config_file=write(tmp_path, "ratio: 0.25\n"))

    assert got == Settings(name="flag", port=2, ratio=0.25, verbose=False)


def test_env_values_as_people_write_them(tmp_path: Path) -> None:
    env = {"MESHLENS_PORT": "1_000", "MESHLENS_RATIO": "1e-3", "MESHLENS_NAME": ""}

    assert resolve(Settings, NO_FLAGS, env=env) == Settings(name="", port=1000, ratio=0.001)
    assert resolve(Settings, NO_FLAGS, env={"MESHLENS_PORT": "0x10"}).port == 16


def test_other_variables_are_ignored() -> None:
    env = {"PORT": "9", "MESHLENS_UNRELATED": "x", "meshlens_port": "9"}

    assert resolve(Settings, NO_FLAGS, env=env) == Settings()


def test_file_keys_may_use_dashes(tmp_path: Path) -> None:
    path = write(tmp_path, "otlp-http-port: 14318\nspool_max_bytes: 1_000_000\nflush-interval: 2\n")

    cfg = resolve(CollectorConfig, {}, env={}, config_file=path)

    assert (cfg.otlp_http_port, cfg.spool_max_bytes, cfg.flush_interval) == (14318, 1_000_000, 2.0)
    assert isinstance(cfg.flush_interval, float)


def test_collector_config_from_all_three(tmp_path: Path) -> None:
    path = write(tmp_path, "host: 0.0.0.0\nquery_port: 18123\nbatch_rows: 1000\nstore: chdb:/from/file\n")
    env = {"MESHLENS_STORE": "chdb:/from/env", "MESHLENS_BATCH_ROWS": "2000"}

    cfg = resolve(CollectorConfig, {"store": None, "batch_rows": 3000, "config": path}, env=env, config_file=path)

    assert (cfg.store, cfg.batch_rows, cfg.host, cfg.query_port) == ("chdb:/from/env", 3000, "0.0.0.0", 18123)
    assert (cfg.otlp_grpc_port, cfg.max_body_bytes, cfg.calls_retention_days) == (4317, MAX_BODY_BYTES, 30)


# -- errors in the file ---------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("port: 1\nname: [\n", r"settings\.yaml line 3: invalid YAML: expected the node content"),
    ("port: 1\n  name: x\n", r"settings\.yaml line 2: invalid YAML: mapping values are not allowed here"),
    ("- port\n- name\n", r"settings\.yaml: expected a mapping of setting: value"),
    ("just a string\n", r"settings\.yaml: expected a mapping"),
    ("[]\n", r"settings\.yaml: expected a mapping"),
    ("0\n", r"settings\.yaml: expected a mapping"),
    ("port: 1\nprot: 2\nnmae: x\n", r"settings\.yaml: unknown setting\(s\): nmae, prot$"),
    ("port: eighty\n", r"settings\.yaml: port: expected int, got 'eighty'$"),
    ("port: 80.5\n", r"settings\.yaml: port: expected int, got 80\.5$"),
    ("port: true\n", r"settings\.yaml: port: expected int, got True$"),
    ("port:\n", r"settings\.yaml: port: expected int, got None$"),
    ("ratio: [1]\n", r"settings\.yaml: ratio: expected float, got \[1\]$"),
    ("ratio: .nan\n", r"settings\.yaml: ratio: expected float, got nan$"),
    ("name: {a: 1}\n", r"settings\.yaml: name: expected str, got \{'a': 1\}$"),
    ("name:\n", r"settings\.yaml: name: expected str, got None$"),
    ("verbose: maybe\n", r"settings\.yaml: verbose: expected bool, got 'maybe'$"),
])
def test_file_errors_name_the_file_and_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        resolve(Settings, NO_FLAGS, env={}, config_file=write(tmp_path, text))

    assert "\n" not in str(exc.value)
    assert str(tmp_path / "settings.yaml") in str(exc.value)


def test_empty_file_is_no_settings(tmp_path: Path) -> None:
    assert resolve(Settings, NO_FLAGS, env={}, config_file=write(tmp_path, "# nothing yet\n")) == Settings()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^cannot read config file {tmp_path}/absent\.yaml: No such file or directory$"):
        resolve(Settings, NO_FLAGS, env={}, config_file=str(tmp_path / "absent.yaml"))


def test_a_bad_file_value_fails_even_when_a_flag_overrides_it(tmp_path: Path) -> None:
    # Unknown keys are refused whatever else is given: a typo never passes silently.
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve(Settings, {**NO_FLAGS, "port": 5}, env={}, config_file=write(tmp_path, "prot: 5\n"))


# -- errors in the environment and flags ------------------------------------------


@pytest.mark.parametrize("env, message", [
    ({"MESHLENS_PORT": "eighty"}, "^MESHLENS_PORT: expected int, got 'eighty'$"),
    ({"MESHLENS_PORT": "80.0"}, "^MESHLENS_PORT: expected int, got '80.0'$"),
    ({"MESHLENS_PORT": ""}, "^MESHLENS_PORT: expected int, got ''$"),
    ({"MESHLENS_RATIO": "half"}, "^MESHLENS_RATIO: expected float, got 'half'$"),
    ({"MESHLENS_RATIO": "nan"}, "^MESHLENS_RATIO: expected float, got 'nan'$"),
    ({"MESHLENS_RATIO": "inf"}, "^MESHLENS_RATIO: expected float, got 'inf'$"),
    ({"MESHLENS_VERBOSE": "2"}, "^MESHLENS_VERBOSE: expected bool, got '2'$"),
])
def test_env_errors_name_the_variable(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(Settings, NO_FLAGS, env=env)


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="^--port: expected int, got 'x'$"):
        resolve(Settings, {**NO_FLAGS, "port": "x"}, env={})


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize("given, message", [
    ({"otlp_http_port": 65536}, "^--otlp-http-port: otlp_http_port must be 0..65535, got 65536$"),
    ({"otlp_grpc_port": -1}, "^--otlp-grpc-port: otlp_grpc_port must be 0..65535, got -1$"),
    ({"query_port": -2}, "^--query-port: query_port must be -1..65535, got -2$"),
    ({"calls_retention_days": -1}, "^--calls-retention-days: calls_retention_days must be 0 or more, got -1$"),
    ({"traces_retention_days": -7}, "^--traces-retention-days: traces_retention_days must be 0 or more, got -7$"),
    ({"batch_rows": 0}, "^--batch-rows: batch_rows must be positive, got 0$"),
    ({"spool_max_bytes": -1}, "^--spool-max-bytes: spool_max_bytes must be positive, got -1$"),
    ({"flush_interval": 0.0}, "^--flush-interval: flush_interval must be positive, got 0.0$"),
])
def test_collector_config_validation_from_flags(given: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(CollectorConfig, given, env={})


def test_validation_names_where_the_bad_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^MESHLENS_OTLP_HTTP_PORT: otlp_http_port must be 0..65535, got 70000$"):
        resolve(CollectorConfig, {}, env={"MESHLENS_OTLP_HTTP_PORT": "70000"})

    path = write(tmp_path, "traces_retention_days: -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: traces_retention_days: traces_retention_days must be 0 or more"):
        resolve(CollectorConfig, {}, env={}, config_file=path)


def test_validate_on_its_own() -> None:
    CollectorConfig(query_port=-1, calls_retention_days=0, otlp_http_port=0).validate()  # all allowed
    with pytest.raises(ValueError, match="^otlp_http_port must be 0..65535, got 99999$"):
        CollectorConfig(otlp_http_port=99999).validate()
    with pytest.raises(ValueError, match="^calls_retention_days must be 0 or more, got -3$"):
        CollectorConfig(calls_retention_days=-3).validate()


def test_validation_errors_of_a_generic_class() -> None:
    with pytest.raises(ConfigError, match="^MESHLENS_PORT: port must be at most 60000, got 60001$"):
        resolve(Settings, NO_FLAGS, env={"MESHLENS_PORT": "60001"})
