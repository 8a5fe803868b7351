"""Data recipes in LLaVA-OneVision's YAML format and subset strategies (data/recipe.py): the
samples each strategy selects, how a recipe becomes weighted sources, and the loader reading one
(selection, proportions, resume); bad recipes are named."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from data.helpers import batch_keys, solid_png

from casa_megatron.config.errors import ConfigError
from casa_megatron.data.blend import BlendOrder
from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator
from casa_megatron.data.recipe import RecipeError, check_strategy, read_recipe, subset_count, subset_indices
from casa_megatron.data.sources import SourceSpec, open_sources


def test_strategies_select_as_llava_does():
    assert subset_count("all", 95) == 95
    assert subset_count("first:10%", 95) == math.ceil(9.5) == 10  # rounded up
    assert subset_count("end:2.5%", 95) == 3 and subset_count("first:1000", 95) == 95  # capped, as a slice
    assert subset_indices("first:3", 10, "a.json") == range(0, 3)
    assert subset_indices("end:3", 10, "a.json") == range(7, 10)
    picked = subset_indices("random:40%", 1000, "a.json")
    assert len(picked) == 400 == len(set(picked.tolist())) and list(picked) == sorted(picked)  # no repeats
    assert (picked == subset_indices("random:40%", 1000, "a.json")).all()  # the same every run
    assert not (picked == subset_indices("random:40%", 1000, "b.json")).all()
    for bad in ("some", "first:0", "first:150%", "random:-1", "first:", 5, "last:3"):
        with pytest.raises(RecipeError, match="sampling strategy"):
            check_strategy(bad, "here")


def _llava(folder, name, n, colour):
    """A LLaVA .json of ``n`` one-image samples whose images sit in ``folder/img``."""
    (folder / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        (folder / "img" / f"{name}{i}.png").write_bytes(solid_png(56, 56, colour))
        rows.append({"id": f"{name}{i}", "image": f"img/{name}{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape ?"},
                                       {"from": "gpt", "value": name}]})
    path = folder / f"{name}.json"
    path.write_text(json.dumps(rows))
    return path


def _recipe(folder, datasets, name="recipe.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return path


def test_a_recipe_becomes_sources_weighted_by_what_they_select(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _llava(data, "red", 10, (200, 0, 0))
    _llava(data, "blue", 30, (0, 0, 200))
    other = _llava(data, "green", 5, (0, 200, 0))
    recipe = _recipe(data, [{"json_path": "red.json", "sampling_strategy": "all"},  # relative to the recipe
                            {"json_path": str(data / "blue.json"), "sampling_strategy": "end:50%"}])
    specs, sources = open_sources([SourceSpec(str(recipe), weight=2), SourceSpec(str(other), weight=1)])
    assert [len(s) for s in sources] == [10, 15, 5]
    assert [s.weight for s in specs] == pytest.approx([2 * 10 / 25, 2 * 15 / 25, 1])
    assert [s.subset for s in specs] == ["all", "end:50%", "all"] and specs[0].recipe == str(recipe)
    assert [sources[1].key(i) for i in range(15)] == [f"blue{i}" for i in range(15, 30)]
    # concatenation's proportions: every selected sample equally likely within the recipe
    blend = BlendOrder([len(s) for s in sources], [s.weight for s in specs], 0, 1, seed=0)
    counts = [0, 0, 0]
    blend.draws(counts, 300)
    assert counts == [80, 120, 100]


def test_the_loader_reads_the_selection_and_resumes_in_it(tmp_path, tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    _llava(data, "red", 6, (200, 0, 0))
    _llava(data, "blue", 20, (0, 0, 200))
    recipe = _recipe(data, [{"json_path": "red.json"}, {"json_path": "blue.json", "sampling_strategy": "random:5"}])
    cfg = DataConfig(source=str(recipe), tokenizer_path=str(tokenizer_dir), seq_length=128, image_seq_length=64,
                     num_workers=0, pack_buffer=2, log_interval=0)
    cfg.validate()
    chosen = {f"blue{i}" for i in subset_indices("random:5", 20, "blue.json")}

    it = make_train_iterator(cfg, 2, 0, 1, seed=3)
    seen = sum(batch_keys(it, 6), [])
    state = json.loads(json.dumps(it.state_dict()))
    after = batch_keys(it, 3)
    it.close()
    assert {k for k in seen if k.startswith("blue")} <= chosen and {k for k in seen if k.startswith("red")}
    resumed = make_train_iterator(cfg, 2, 0, 1, seed=3)
    resumed.load_state_dict(state)
    assert batch_keys(resumed, 3) == after
    resumed.close()


def test_bad_recipes_are_named(tmp_path, tokenizer_dir):
    _llava(tmp_path, "red", 2, (200, 0, 0))
    cases = [
        ({"datasets": []}, "expected a non-empty 'datasets' list"),
        ({"datasets": [{"json_path": "nope.json"}]}, "datasets\\[0\\]: .*nope.json does not exist"),
        ({"datasets": [{"json_path": "red.json", "sampling": "all"}]}, "unknown keys \\['sampling'\\]"),
        ({"datasets": [{"json_path": "red.json", "sampling_strategy": "first:0"}]}, "selects nothing"),
        ({"datasets": [{"json_path": "inner.yaml"}]}, "recipes do not nest"),
        ({"datasets": [{"sampling_strategy": "all"}]}, "no json_path"),
    ]
    _recipe(tmp_path, [{"json_path": "red.json"}], "inner.yaml")
    for doc, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(RecipeError, match=message):
            read_recipe(path)
        cfg = DataConfig(source=str(path), tokenizer_path=str(tokenizer_dir))
        with pytest.raises(ConfigError, match=f"data.source: data recipe {path}"):
            cfg.validate()  # before anything is built
    with pytest.raises(ValueError, match="subset 'first:1' of a recipe"):
        SourceSpec.parse({"path": str(tmp_path / "inner.yaml"), "subset": "first:1"}, "data.sources[0]")
    spec = SourceSpec.parse({"path": str(tmp_path / "red.json"), "subset": "end:1"}, "data.sources[0]")
    _, (source,) = open_sources([spec])
    assert len(source) == 1 and source.key(0) == "red1"
