"""Settings: flags and TPTT_* environment variables, flags winning, bad values refused with a message."""

import pytest

from server.settings import Settings


def test_defaults_env_and_flags():
    assert Settings.from_args([], environ={}).port == 8000
    env = {"TPTT_PORT": "9001", "TPTT_PREFIX_REUSE": "false", "TPTT_API_KEY": "a, b", "TPTT_STORE_DIR": "/tmp/s"}
    settings = Settings.from_args([], environ=env)
    assert (settings.port, settings.prefix_reuse, settings.api_key, settings.store_dir) == (9001, False,
                                                                                            ["a", "b"], "/tmp/s")
    flagged = Settings.from_args(["--port", "9002", "--prefix-reuse", "--api-key", "c", "--api-key", "d"], environ=env)
    assert (flagged.port, flagged.prefix_reuse, flagged.api_key) == (9002, True, ["c", "d"])
    assert flagged.engine_config().store_dir == "/tmp/s"


@pytest.mark.parametrize("env", [{"TPTT_PREFIX_REUSE": "maybe"}, {"TPTT_PORT": "0"}, {"TPTT_DTYPE": "int8"},
                                 {"TPTT_MAX_NUM_SEQS": "0"}, {"TPTT_THREADS": "-1"}])
def test_bad_values_are_refused(env):
    with pytest.raises(ValueError):
        Settings.from_args([], environ=env)


def test_every_setting_is_documented_in_the_readme():
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [f.name for f in fields(Settings) if f"`TPTT_{f.name.upper()}`" not in readme]
    assert not missing
