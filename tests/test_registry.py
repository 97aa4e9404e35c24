"""The one registry mechanism: lookup, build, and errors that list what would have been valid."""

import pytest

from conftest import call_main, error_lines, tiny_args
from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS, MODELS, OBJECTIVES, REGULARIZERS, SAMPLERS, SCHEDULES, TOKENIZERS, Registry

FAMILIES = [MODELS, OBJECTIVES, REGULARIZERS, SCHEDULES, SAMPLERS, TOKENIZERS, DATASETS]


def test_builtins_are_registered():
    assert "transformer" in MODELS
    assert {"masked_discrete", "autoregressive"} <= set(OBJECTIVES.names())
    assert {"linear", "cosine"} <= set(SCHEDULES.names())
    assert {"ancestral", "remask", "ar"} <= set(SAMPLERS.names())
    assert {"bpe", "byte", "hf"} <= set(TOKENIZERS.names())
    assert {"text", "embedded", "wikitext2"} <= set(DATASETS.names())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda r: r.family)
def test_unknown_name_lists_every_registered_name(family):
    with pytest.raises(DiffuseError) as err:
        family.build({"name": "no_such_thing"})
    message = str(err.value)
    assert "no_such_thing" in message and "\n" not in message
    for name in family.names():
        assert name in message


def test_build_passes_config_and_runtime_keywords_and_rejects_unknown_ones():
    reg = Registry("widget")

    @reg.register("box")
    class Box:
        def __init__(self, size: int, colour: str = "red"):
            self.size, self.colour = size, colour

    box = reg.build({"name": "box", "colour": "blue"}, size=3)
    assert (box.size, box.colour, Box.registry_name) == (3, "blue", "box")
    with pytest.raises(DiffuseError, match="widget 'box' got unknown key.*colur.*accepted: size, colour"):
        reg.build({"name": "box", "colur": "blue"}, size=3)
    with pytest.raises(DiffuseError, match="no 'name'.*box"):
        reg.build({"size": 3})


def test_a_name_cannot_be_registered_twice():
    reg = Registry("widget")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(RuntimeError, match="twice"):
        reg.register("a")(type("B", (), {}))


def test_names_are_sorted():
    reg = Registry("widget")
    for name in ("b", "c", "a"):
        reg.register(name)(type(name, (), {}))
    assert reg.names() == ["a", "b", "c"]


def test_unknown_component_through_the_cli_lists_registered_names(corpus, tmp_path):
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "objective.name=no_such_objective"))
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result
    assert "no_such_objective" in lines[0] and "masked_discrete" in lines[0] and "autoregressive" in lines[0]
    assert "Traceback" not in result.stderr
