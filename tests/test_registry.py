"""One registry shape: every vocabulary is a `cbir.registry.Registry`, and what `cbir` prints
(``cbir pipelines``, ``cbir models``, ``cbir localizers``, ``--help``, "unknown" errors) comes
from the registries, so an entry cannot be added without it showing up."""

from __future__ import annotations

import pickle

import pytest
import typer
from typer.testing import CliRunner

import cbir.localize.tscam  # noqa: F401 - imported before the others, as `cbir` itself does
from cbir.cli import app
from cbir.local import ENCODERS, REGIONS
from cbir.localize import LOCALIZERS, list_localizers
from cbir.models import BACKBONES, ENGINES, BackboneError, create_engine, get_backbone
from cbir.pooling import POOLINGS, F, parse_pooling
from cbir.postprocess import POSTPROCESS
from cbir.registry import Entry, Registry
from cbir.rerank import RERANKERS
from cbir.toolbox import MODULES

runner = CliRunner()

# The stages of a pipeline string that `cbir pipelines` lists, with the prefix their tokens carry.
PIPELINE_REGISTRIES = {"backbone": (BACKBONES, ""), "regions": (REGIONS, "regions:"), "encoder": (ENCODERS, ""),
                       "pooling": (POOLINGS, ""), "post": (POSTPROCESS, ""), "rerank": (RERANKERS, "")}


def _listed(output: str) -> set[str]:
    """The first word of each indented line: the tokens a listing names."""
    return {line.split()[0] for line in output.splitlines() if line.startswith("  ") and line.strip()}


@pytest.mark.parametrize("registry", [POOLINGS, POSTPROCESS, ENCODERS, REGIONS, RERANKERS, BACKBONES, ENGINES,
                                      MODULES, LOCALIZERS])
def test_every_vocabulary_is_a_registry(registry):
    assert isinstance(registry, Registry)
    assert registry.names() and all(isinstance(e, Entry) and e.summary for e in registry)


@pytest.mark.parametrize("stage", list(PIPELINE_REGISTRIES))
def test_pipelines_lists_every_entry(stage):
    registry, prefix = PIPELINE_REGISTRIES[stage]
    r = runner.invoke(app, ["pipelines"])
    assert r.exit_code == 0, r.output
    assert {prefix + e.usage for e in registry} <= _listed(r.output)


def test_a_new_entry_shows_up_in_pipelines(monkeypatch):
    monkeypatch.setitem(POOLINGS._entries, "TESTPOOL",
                        Entry("TESTPOOL", F.ave, "a pooling only this test registers", pattern=""))
    assert "TESTPOOL" in _listed(runner.invoke(app, ["pipelines"]).output)


def test_models_and_localizers_list_every_entry():
    models = runner.invoke(app, ["models"]).output
    assert {e.usage for e in BACKBONES} <= {line.split()[0] for line in models.splitlines() if line.strip()}
    listed = [line.split()[0].partition(":")[0] for line in runner.invoke(app, ["localizers"]).output.splitlines()]
    assert listed[:-1] == LOCALIZERS.names() and listed[-1] == "gt"


def test_engine_and_localizer_help_name_every_entry():
    command = typer.main.get_command(app)
    for name in ("index", "search", "eval"):
        params = {p.name: p.help for p in command.commands[name].params}
        assert all(e.name in params["engine"] for e in ENGINES)
        assert all(e.name in params["localizer"] for e in LOCALIZERS)


def test_localizers_are_listed_in_the_order_of_their_modules():
    # tscam's module was imported first (above): the order is still the lazy modules' order.
    assert list_localizers() == ["whole", "saliency", "pspnet", "yolo", "tscam"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(BackboneError, match="unknown engine 'tpu'; known: onnx, onnx-int8, torch"):
        create_engine(get_backbone("efficientnet_lite0"), ["bn2"], "tpu")
    with pytest.raises(BackboneError, match="unknown backbone 'nope'; known: efficientnet_lite0, .*open_nsfw, timm:<model>"):
        get_backbone("nope")
    with pytest.raises(ValueError, match="unknown pooling 'NOPE'; known: SUM, AVE, MAX, GeM<p>, .*CAM<k>"):
        POOLINGS.get("NOPE")
    with pytest.raises(KeyError, match="unknown toolbox module 'nope'; known: .*cbam"):
        MODULES.get("nope")


def test_glued_tokens_take_the_longest_name():
    entry, m = POSTPROCESS.match("PCAWS64-0.5")
    assert entry.name == "PCAWS" and m.group(0) == "64-0.5"
    assert POSTPROCESS.match("PCAWX") is None and RERANKERS.match("aQE10a3")[0].name == "aQE"


def test_kind_specific_fields_read_as_attributes():
    gem, p = parse_pooling("GeM")
    assert (gem.option, p, gem.combine, gem.needs) == ("p", 3.0, "power", ())
    assert MODULES.get("fpn").input_kind == "pyramid"
    with pytest.raises(AttributeError):
        gem.no_such_field  # noqa: B018
    assert pickle.loads(pickle.dumps(gem)) == gem  # no recursion through the extra fields
