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
    assert Settings.from_args([], environ={}).engine_config().mixed_steps
    assert not Settings.from_args(["--no-mixed-steps"], environ={}).engine_config().mixed_steps


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


@pytest.mark.parametrize("capabilities, expected", [({"avx512_bf16": True}, "bfloat16"), ({"amx_bf16": True}, "bfloat16"),
                                                   ({"avx512_bf16": False, "avx2": True}, "float32")])
def test_auto_dtype_is_bfloat16_only_on_cpus_with_native_bfloat16(monkeypatch, capabilities, expected):
    import torch

    from tptt_runtime.loading import resolve_dtype

    def served_dtype(settings):
        return resolve_dtype(settings.dtype, settings.device)

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert Settings.from_args([], environ={}).dtype == "auto"
    assert served_dtype(Settings.from_args([], environ={})) == getattr(torch, expected)
    assert served_dtype(Settings.from_args(["--dtype", "float32"], environ={})) == torch.float32


def test_auto_dtype_on_a_gpu_follows_its_bfloat16_support(monkeypatch):
    import torch

    from tptt_runtime.loading import preferred_dtype

    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert preferred_dtype("cuda") == expected
