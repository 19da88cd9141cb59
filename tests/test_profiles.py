"""Reference profiles: `profile = spec | official | htfllib` sets every algorithm's options, under the user's own."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from algorithms.base import PROFILES, Algorithm
from bench.config import RunConfig, load_config
from bench.errors import UserError
from bench.registry import algorithms


@dataclasses.dataclass
class _Hp:
    a: int = 1
    b: str = "x"


class _Profiled(Algorithm):
    name = "profiled"
    Hyperparams = _Hp
    profiles = {"official": {"a": 2, "b": "y"}, "htfllib": {"a": 3}}


@pytest.mark.parametrize("profile, expected", [("spec", (1, "x")), ("official", (2, "y")), ("htfllib", (3, "x"))])
def test_profile_values_apply_and_user_overrides_win(profile, expected):
    cfg = RunConfig(profile=profile)
    hp = _Profiled.hparams_for(cfg)
    assert (hp.a, hp.b) == expected
    cfg.algo = {"profiled": {"a": 7}}
    assert _Profiled.hparams_for(cfg).a == 7
    assert _Profiled.hparams_for(cfg).b == expected[1]


def test_every_builtin_profile_names_real_fields_with_valid_values():
    for name, cls in algorithms().items():
        fields = {f.name for f in dataclasses.fields(cls.Hyperparams)}
        for profile, values in cls.profiles.items():
            assert profile in PROFILES and profile != "spec", (name, profile)
            assert set(values) <= fields, (name, profile, set(values) - fields)
            cls.make_hparams(values)  # validates


def test_profile_changes_an_option_through_load_config():
    cfg = load_config(sets=["profile=official"], options={"algorithms": ["fml"]})
    assert cfg.profile == "official"
    with pytest.raises(UserError, match="unknown profile 'nope'; valid: spec, official, htfllib"):
        load_config(options={"profile": "nope"})


def test_unknown_profile_on_the_cli_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--algo", "fml", "--dataset", "synthetic",
                             "--profile", "nope", "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: unknown profile 'nope'; valid: spec, official, htfllib"]
    assert not any(tmp_path.iterdir())


def test_overrides_reach_an_algorithm_whose_name_is_not_canonical():
    """Config tables are stored under the canonical name ('my-algo' -> 'myalgo'); hparams_for finds them."""
    from dataclasses import dataclass

    from algorithms.base import Algorithm
    from bench.config import RunConfig

    @dataclass
    class HP:
        rank: int = 4

    class Hyphenated(Algorithm):
        name = "my-algo"
        Hyperparams = HP

    assert Hyphenated.hparams_for(RunConfig(algo={"myalgo": {"rank": 9}})).rank == 9
