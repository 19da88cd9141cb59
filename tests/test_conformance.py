"""The conformance kit (bench.testing.check_algorithm): every registered built-in passes it, the example
third-party plugin in tests/plugins/ passes it, and deliberately broken plugins fail it with a message that
names the plugin and the failed check."""
from __future__ import annotations

import importlib.util
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from algorithms.base import Algorithm, NoHyperparams, Phase
from algorithms.standalone import Standalone
from bench.errors import UserError
from bench.registry import algorithms, canonical_algorithm_name
from bench.testing import CHECKS, ConformanceError, check_algorithm

PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"


def failures_of(cls, **options) -> ConformanceError:
    with pytest.raises(AssertionError) as info:
        check_algorithm(cls, **options)
    err = info.value
    assert isinstance(err, ConformanceError)
    assert f"algorithm plugin {cls.name!r}" in str(err)
    return err


# ---- every built-in passes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(algorithms()))
def test_every_builtin_passes(name):
    threads = torch.get_num_threads()
    result = check_algorithm(algorithms()[name])
    assert result.algorithm == algorithms()[name].name and result.checks == CHECKS
    assert result.settings["model_group"] == algorithms()[name].example_group()
    assert torch.get_num_threads() == threads  # the kit restores the thread count


# ---- broken plugins fail, each on its own check --------------------------------------------------------------

class TrainsOutsideCtx(Standalone):
    """Trains with its own SGD loop instead of yielding a Phase: no loss recorded (NaN), no FLOPs counted."""
    name = "conformance-outside"

    def client_update(self, client, payload, round_index):
        model = client.state["model"].train()
        opt = torch.optim.SGD(model.parameters(), lr=self.ctx.cfg.lr)
        for x, y in self.ctx.data.train_batches(client.split.train, self.ctx.cfg.batch_size, self.ctx.generator):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return {}


def test_training_outside_phases_fails_with_finite_loss():
    err = failures_of(TrainsOutsideCtx)
    assert set(err.failures) == {"finite loss"}
    assert "round 1: train_loss is nan" in str(err) and "yield the local training as Phases" in str(err)


class FreshGeneratorNoise(Standalone):
    """Uploads torch.rand noise drawn from a generator seeded from OS entropy (not the run's generator); the
    server's mean of it shifts every prediction."""
    name = "conformance-noise"

    def init_server(self):
        self.offset = torch.zeros(self.ctx.num_classes)

    def client_update(self, client, payload, round_index):
        yield from super().client_update(client, payload, round_index)
        fresh = torch.Generator()
        fresh.seed()  # non-deterministic seed
        return {"offset": torch.rand(self.ctx.num_classes, generator=fresh)}

    def aggregate(self, uploads, round_index):
        self.offset = torch.stack([u["offset"] for u in uploads.values()]).mean(0)

    def predict(self, client, x):
        return client.state["model"](x) + self.offset


def test_nondeterministic_upload_fails_determinism():
    err = failures_of(FreshGeneratorNoise)
    assert "determinism under a seed" in err.failures
    assert "two fresh runs with seed 0 differ at round 1" in str(err) and "test_loss" in str(err)
    assert set(err.failures) <= {"determinism under a seed", "checkpoint round trip"}


class GlobalRNGNoise(FreshGeneratorNoise):
    """The same noise from torch's global RNG: the Simulation seeds it and checkpoints it, so this is fine."""
    name = "conformance-global-rng"

    def client_update(self, client, payload, round_index):
        yield from Standalone.client_update(self, client, payload, round_index)
        return {"offset": torch.rand(self.ctx.num_classes)}


def test_torch_global_rng_is_seeded_and_checkpointed_by_the_run():
    check_algorithm(GlobalRNGNoise)


def _shift_class_zero(logits: torch.Tensor, amount: float) -> torch.Tensor:
    bias = torch.zeros(logits.shape[1])
    bias[0] = amount
    return logits + bias


class ExcludedCounter(Standalone):
    """Counts aggregations in an attribute that checkpoint_exclude keeps out of the checkpoint."""
    name = "conformance-excluded"
    checkpoint_exclude = ("aggregations",)

    def init_server(self):
        self.aggregations = 0

    def aggregate(self, uploads, round_index):
        self.aggregations += 1

    def predict(self, client, x):
        return _shift_class_zero(client.state["model"](x), 0.5 * self.aggregations)


def test_state_excluded_from_the_checkpoint_fails_the_round_trip():
    err = failures_of(ExcludedCounter)
    assert set(err.failures) == {"checkpoint round trip"}
    assert "resumed from the checkpoint taken after round 1, round 2 differs" in str(err)
    assert "checkpoint_exclude" in str(err)


AGGREGATIONS = 0  # ModuleGlobalCounter's state, outside the algorithm


class ModuleGlobalCounter(Standalone):
    name = "conformance-global"

    def aggregate(self, uploads, round_index):
        global AGGREGATIONS
        AGGREGATIONS += 1

    def predict(self, client, x):
        return _shift_class_zero(client.state["model"](x), 0.5 * AGGREGATIONS)


def test_state_in_a_module_global_fails_the_round_trip_and_determinism():
    global AGGREGATIONS
    AGGREGATIONS = 0
    err = failures_of(ModuleGlobalCounter)
    assert set(err.failures) == {"checkpoint round trip", "determinism under a seed"}
    assert "module-level global" in str(err)


class OnePhaseNameTwoComputations(Standalone):
    """A full-model epoch, then a header-only epoch (extractor detached: no backward through it) under the
    SAME phase name: the FLOP cache reuses the full step's count for the cheaper one."""
    name = "conformance-phase"

    def client_update(self, client, payload, round_index):
        model = client.state["model"].train()
        yield Phase("local", [model], 1)
        head_only = lambda x, y: F.cross_entropy(model.header(model.extractor(x).detach()), y)  # noqa: E731
        yield Phase("local", [model.header], 1, loss=head_only)
        return {}


def test_flops_that_differ_cached_and_uncached_fail():
    err = failures_of(OnePhaseNameTwoComputations)
    assert set(err.failures) == {"cached FLOPs equal full counting"}
    assert "round 1: train_flops" in str(err) and "its own phase name" in str(err)


class SloppyContract(Standalone):
    """predict returns an extra logit column; make_hparams ignores what it is given."""
    name = "conformance-sloppy"

    @classmethod
    def make_hparams(cls, overrides=None):
        return NoHyperparams()

    def predict(self, client, x):
        logits = client.state["model"](x)
        return torch.cat([logits, logits[:, :1]], dim=1)


def test_contract_violations_are_each_reported():
    err = failures_of(SloppyContract)
    assert set(err.failures) == {"basic contract"}
    text = str(err)
    assert "expected (batch, num_classes) = (8, 10)" in text and "returned shape (8, 11)" in text
    assert "accepted the unknown key" in text


@dataclass
class UnsetModeHyperparams:
    mode: str = "unset"

    def validate(self) -> None:
        if self.mode not in ("a", "b"):
            raise UserError(f"conformance-strict.mode must be 'a' or 'b', got {self.mode!r}")


class DefaultsDoNotValidate(Standalone):
    name = "conformance-strict"
    Hyperparams = UnsetModeHyperparams


def test_hyperparameter_defaults_that_do_not_validate_fail():
    err = failures_of(DefaultsDoNotValidate)
    assert "basic contract" in err.failures and "the Hyperparams defaults do not validate" in str(err)
    assert "reference run" in err.failures  # the runs cannot start either, and say so
    assert "conformance-strict.mode must be 'a' or 'b'" in str(err)


# ---- the example third-party plugin ---------------------------------------------------------------------------

def load_example_plugin():
    """The entry point's target, imported by path (no install): (entry point name, class, module file)."""
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    points = project["project"]["entry-points"]["bench.algorithms"]
    assert len(points) == 1
    (ep_name, target), = points.items()
    module_name, _, attr = target.partition(":")
    path = PLUGIN_DIR / f"{module_name.replace('.', '/')}.py"
    assert path.exists(), f"entry point {target} names no file in tests/plugins"
    assert module_name in project["tool"]["setuptools"]["py-modules"]
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # as an installed plugin would be (dataclasses look it up)
        spec.loader.exec_module(module)
    return ep_name, getattr(module, attr), path


def test_example_plugin_declares_its_entry_point():
    ep_name, cls, path = load_example_plugin()
    assert isinstance(cls, type) and issubclass(cls, Algorithm) and cls.__module__ == path.stem
    assert canonical_algorithm_name(ep_name) == canonical_algorithm_name(cls.name)
    assert canonical_algorithm_name(cls.name) not in algorithms()  # not a built-in: found via the entry point


def test_example_plugin_passes():
    _, cls, _ = load_example_plugin()
    check_algorithm(cls)
    check_algorithm(cls, hparams={"server_lr": 0.5, "aggregation": "uniform"})
