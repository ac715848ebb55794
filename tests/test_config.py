"""Configs load into frozen dataclasses; unknown keys and wrong types name the key and file."""

from __future__ import annotations

import dataclasses

import pytest

from volseg.config import Config, default_config_path, load_config
from volseg.errors import ConfigError
from volseg.strip.config import StripConfig, load_strip_config


def test_default_yaml_matches_builtin_defaults():
    assert load_config(default_config_path()) == Config()


def test_strip_yaml_loads(tmp_path):
    cfg = load_strip_config(default_config_path().parent / "strip.yaml")
    assert isinstance(cfg, StripConfig)
    assert cfg.net.channels == (16, 32, 64, 128, 256)
    # the file's values are used, not the defaults: non-default values come back
    path = tmp_path / "strip.yaml"
    path.write_text("net:\n  channels: [8, 16, 32, 64, 128]\ndata:\n  synth_count: 7\n")
    cfg = load_strip_config(path)
    assert StripConfig().net.channels != (8, 16, 32, 64, 128) and StripConfig().data.synth_count != 7
    assert cfg.net.channels == (8, 16, 32, 64, 128) and cfg.data.synth_count == 7
    assert cfg.augment == StripConfig().augment
    path.write_text("data:\n  synth_cnt: 7\n")
    with pytest.raises(ConfigError, match="unknown key 'data.synth_cnt'") as info:
        load_strip_config(path)
    assert str(path) in str(info.value)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().n4.backend = "ants"  # type: ignore[misc]


@pytest.mark.parametrize("text,match", [
    ("n4:\n  shrinkk: 2\n", "unknown key 'n4.shrinkk'"),
    ("gridd:\n  size: [1, 2, 3]\n", "unknown key 'gridd'"),
    ("n4:\n  convergence: fast\n", "key 'n4.convergence' must be a number"),
    ("grid:\n  size: [96, 128]\n", "key 'grid.size' must have 3 items"),
    ("grid:\n  size: [96, 128, 16.5]\n", r"key 'grid.size\[2\]' must be an integer"),
    ("n4:\n  backend: fsl\n", "key 'n4.backend' must be one of"),
    ("n4: 3\n", "key 'n4' must be a mapping"),
    ("n4: [\n", "not valid YAML"),
])
def test_bad_config_names_key_and_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_partial_config_keeps_other_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("n4:\n  iterations: [10, 10]\n  shrink: [2, 2, 1]\n")
    cfg = load_config(path)
    assert cfg.n4.iterations == (10, 10) and cfg.n4.shrink == (2, 2, 1)
    assert cfg.grid == Config().grid


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
