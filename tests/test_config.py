from pathlib import Path

import pytest

from coverwatch.streamer.config import Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_equals_defaults():
    assert load_config(ROOT / "config.toml") == Config()


def test_all_problems_reported_at_once_with_suggestions():
    with pytest.raises(ConfigError) as err:
        parse_config({"stream": {"hop_ss": 2.0, "windows_s": [10, "x"]}, "decision": {"start_hops": 0}, "modle": {}})
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "stream.hop_ss: unknown key (did you mean 'stream.hop_s'?)" in text
    assert "modle: unknown key (did you mean 'model'?)" in text
    assert "stream.windows_s[1]: expected float, got str" in text
    assert "decision.start_hops: 0 is out of range" in text


@pytest.mark.parametrize(
    "table, fragment",
    [
        ({"stream": {"hop_s": "fast"}}, "stream.hop_s: expected float"),
        ({"sinks": {"stdout": 1}}, "sinks.stdout: expected bool"),
        ({"decision": {"start_hops": True}}, "decision.start_hops: expected int"),
        ({"index_build": {"index_type": "lsh"}}, "not one of 'auto', 'flat', 'hnsw', 'ivf'"),
        ({"stream": {"windows_s": [20.0, 10.0]}}, "strictly increasing"),
        ({"decision": {"start_threshold": 0.5, "end_threshold": 0.7}}, "hysteresis"),
        ({"stream": 3}, "expected a [stream] table"),
        ({"train": {"d_model": 30, "n_heads": 4}}, "divisible"),
    ],
)
def test_invalid_values_are_named(table, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        parse_config(table)
    assert fragment in str(err.value)


def test_ints_accepted_for_floats():
    assert parse_config({"stream": {"hop_s": 5}}).stream.hop_s == 5.0


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[stream\nhop_s = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
