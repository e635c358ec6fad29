"""The CLI's options come from the config dataclasses: one default, written once."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import pytest

from mechscope.cli import _parser
from mechscope.config_io import from_dict
from mechscope.data.harvest import HarvestConfig
from mechscope.errors import InputError
from mechscope.features.pipeline import analyse_features
from mechscope.models.config import ModelConfig
from mechscope.options import add_options, cli_fields, config_from_args, option
from mechscope.report.pipeline import ReportConfig
from mechscope.sae.config import SAEConfig


def _sub(name: str):
    parser = _parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_report_defaults_are_the_dataclass_defaults():
    args = _sub("report").parse_args([])
    assert config_from_args(ReportConfig, args) == ReportConfig()
    # every field is an option (the docstring's promise), under its own dest
    for f in dataclasses.fields(ReportConfig):
        assert getattr(args, f.name) == f.default, f.name


def test_harvest_defaults_are_the_dataclass_defaults():
    args = _sub("harvest").parse_args(["--hooks", "blocks.0.hook_resid_post", "--tokens", "100", "--out", "x"])
    cfg = config_from_args(HarvestConfig, args)
    assert cfg == HarvestConfig(hooks=["blocks.0.hook_resid_post"], n_tokens=100)
    for f in cli_fields(HarvestConfig):
        if f.default is not dataclasses.MISSING:
            assert getattr(args, f.name) == f.default, f.name
    with pytest.raises(SystemExit):  # required: hooks and tokens have no default
        _sub("harvest").parse_args(["--out", "x", "--tokens", "5"])


def test_renamed_and_negated_flags():
    args = _sub("harvest").parse_args(["--hooks", "a,b", "--tokens", "7", "--out", "x", "--keep-bos",
                                       "--no-tokens", "--dtype", "bfloat16"])
    cfg = config_from_args(HarvestConfig, args)
    assert (cfg.hooks, cfg.n_tokens, cfg.exclude_bos, cfg.keep_tokens, cfg.dtype) == (["a", "b"], 7, False, False,
                                                                                      "bfloat16")
    r = config_from_args(ReportConfig, _sub("report").parse_args(
        ["--dashboards", "5", "--no-progress", "--layer", "2", "--keep-activations", "--sae-epochs", "1.5"]))
    assert (r.n_dashboards, r.progress, r.layer, r.keep_activations, r.sae_epochs) == (5, False, 2, True, 1.5)
    with pytest.raises(SystemExit):
        _sub("report").parse_args(["--circuit-method", "nope"])


def test_dashboards_defaults_match_analyse_features():
    """`mechscope dashboards` forwards to analyse_features: its hand-written defaults must be the API's."""
    args = _sub("dashboards").parse_args(["sae", "--out", "x"])
    sig = inspect.signature(analyse_features).parameters
    for dest, param in (("corpus", "corpus"), ("tokens", "tokens"), ("score_tokens", "score_tokens"),
                        ("pages", "n_pages"), ("seed", "seed")):
        assert getattr(args, dest) == sig[param].default, dest


def test_add_options_on_a_toy_config():
    import argparse

    @dataclass
    class Toy:
        name: str = option(help="required")
        width: int | None = option(None, help="optional int")
        ratio: float = option(0.5)
        fast: bool = option(False)
        safe: bool = option(True)
        hidden: int = option(3, cli=False)

    p = argparse.ArgumentParser()
    add_options(p, Toy)
    t = config_from_args(Toy, p.parse_args(["--name", "a", "--width", "4", "--fast", "--no-safe"]))
    assert t == Toy(name="a", width=4, ratio=0.5, fast=True, safe=False, hidden=3)
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "a", "--hidden", "1"])


@pytest.mark.parametrize("cls", [ModelConfig, SAEConfig, HarvestConfig])
def test_from_dict_rejects_unknown_keys_by_name(cls):
    with pytest.raises(InputError, match=r"Unknown .*fields \['bogus', 'typo'\]"):
        from_dict(cls, {"bogus": 1, "typo": 2})
    with pytest.raises(InputError, match="from a dict"):
        from_dict(cls, [1, 2])


def test_from_dict_round_trip():
    cfg = SAEConfig(arch="topk", d_in=8, n_latents=16, k=2)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert from_dict(HarvestConfig, {"hooks": "a,b", "n_tokens": 3}).hooks == ["a", "b"]


def test_train_sae_defaults_come_from_train_config():
    """train-sae's hyper-parameters default to TrainConfig's, except the declared shell defaults; the train()
    function's keyword defaults agree with TrainConfig too (one source of truth)."""
    from mechscope.cli import TRAIN_SAE_CLI_DEFAULTS
    from mechscope.sae.train import train
    from mechscope.sae.train_config import TrainConfig

    args = _sub("train-sae").parse_args(["--hook", "h", "--out", "x"])
    dest_of = {"arch": "arch", "n_latents": "latents", "k": "k", "steps": "steps", "batch_size": "batch_size",
               "lr": "lr", "l1_coeff": "l1_coeff", "l0_coeff": "l0_coeff", "seed": "seed",
               "resample_every": "resample_every"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, dest in dest_of.items():
        assert getattr(args, dest) == TRAIN_SAE_CLI_DEFAULTS.get(name, fields[name]), name
    assert set(TRAIN_SAE_CLI_DEFAULTS) <= set(fields)
    for name, p in inspect.signature(train).parameters.items():
        if name in fields and p.default is not inspect.Parameter.empty:
            assert p.default == fields[name], f"train({name}=...) default differs from TrainConfig"
