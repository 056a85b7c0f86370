"""The recipe schema: every shipped recipe validates, and each kind of mistake gives its exact line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROJECT

from finetune import config, recipe
from finetune.cli import main
from finetune.errors import FinetuneError

SHIPPED = sorted((PROJECT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    loaded = recipe.load(str(path))
    assert loaded.name == path.stem
    assert loaded.description, "shipped recipes describe themselves for `finetune recipes list`"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "data:\n  sources:\n    - path: rows.jsonl\n"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (MINIMAL + "train:\n  lerning_rate: 0.1\n", "train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        (MINIMAL + "trian:\n  epochs: 1\n", "trian: unknown key (did you mean 'train'?)"),
        (MINIMAL + "train:\n  max_steps: ten\n", "train.max_steps: expected an integer, got 'ten'"),
        (
            MINIMAL + "model:\n  quantization: fp4\n",
            "model.quantization: expected one of 'none', 'nf4' or 'int8', got 'fp4'",
        ),
        (MINIMAL + "train:\n  learning_rate: 0\n", "train.learning_rate: Input should be greater than 0, got 0"),
        (MINIMAL + "adapter:\n  type: ia3\n", "adapter.type: expected one of 'lora', 'dora' or 'rslora', got 'ia3'"),
        (
            MINIMAL + "model:\n  trust_remote_code: maybe\n",
            "model.trust_remote_code: expected true or false, got 'maybe'",
        ),
        (
            "data:\n  sources:\n    - path: a.jsonl\n      reader: messagez\n",
            "data.sources.0.reader: unknown reader 'messagez' (did you mean 'messages'?)",
        ),
        ("data:\n  sources:\n    - reader: messages\n", "data.sources.0: give exactly one of 'path' or 'hub'"),
        ("model:\n  base: embedded\n", "data: required key is missing"),
        (
            MINIMAL + "train:\n  method: dpo\n  packing: true\n",
            "recipe: train.packing packs SFT rows, and train.method dpo trains on preference rows, which are not "
            "packed; remove train.packing",
        ),
    ],
)
def test_bad_recipes_give_their_exact_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(FinetuneError) as error:
        recipe.load(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: {line}"), message
    assert "\n" not in message


def test_extends_merges_sections_and_overrides_win(tmp_path):
    write(tmp_path, MINIMAL + "train:\n  learning_rate: 0.001\n  batch_size: 8\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\ntrain:\n  batch_size: 2\n", "child.yaml")
    loaded = recipe.load(str(child), ["train.max_steps=50", "adapter.target_modules=[q_proj, v_proj]"])
    assert loaded.name == "child"
    assert loaded.train.learning_rate == 0.001  # inherited
    assert loaded.train.batch_size == 2  # child wins
    assert loaded.train.max_steps == 50  # override parsed as an int
    assert loaded.adapter.target_modules == ["q_proj", "v_proj"]
    assert loaded.data.sources[0].path == "rows.jsonl"


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "extends: b.yaml\n" + MINIMAL, "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(FinetuneError, match="'extends' forms a cycle"):
        recipe.load(str(tmp_path / "a.yaml"))


def test_python_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path, MINIMAL + "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(FinetuneError, match="invalid YAML"):
        recipe.load(str(path))


def test_every_field_has_a_description_and_a_default():
    reference = recipe.schema_reference()
    for section in (
        recipe.ModelSection,
        recipe.AdapterSection,
        recipe.TrainSection,
        recipe.DataSection,
        recipe.SourceSection,
        recipe.DpoSection,
        recipe.KtoSection,
        recipe.OrpoSection,
        recipe.ExportSection,
        recipe.EvalSection,
    ):
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no description"
            if name not in ("sources",):
                assert not field.is_required() or section is recipe.DataSection, (
                    f"{section.__name__}.{name} has no default"
                )
                assert f"{name} (default" in reference


def test_show_prints_the_resolved_recipe(capsys):
    assert main(["recipes", "show", "medical", "train.max_steps=7"]) == 0
    shown = capsys.readouterr().out
    assert "max_steps: 7" in shown and "quantization: none" in shown


def test_list_names_every_shipped_recipe(capsys):
    assert main(["recipes", "list"]) == 0
    listed = capsys.readouterr().out
    for path in SHIPPED:
        assert path.stem in listed
    assert "INVALID" not in listed


def test_cli_bad_recipe_is_one_line_and_exit_2(capsys):
    assert main(["run", "medical", "train.epochs=-1"]) == 2
    err = capsys.readouterr().err
    assert err == "error: recipes/medical.yaml: train.epochs: Input should be greater than 0, got -1\n"


def test_readme_recipe_reference_matches_the_schema():
    readme = (PROJECT / "README.md").read_text()
    assert "```\n" + recipe.schema_reference() + "\n```" in readme, (
        "README's recipe reference is stale: paste `finetune recipes schema`"
    )


def test_an_override_inside_a_list_leaves_the_callers_mapping_alone():
    data = {"data": {"sources": [{"path": "a.json", "reader": "pubmedqa"}]}}
    changed = config.apply_overrides(data, ["data.sources.0.limit=250"])
    assert changed["data"]["sources"][0]["limit"] == 250
    assert data == {"data": {"sources": [{"path": "a.json", "reader": "pubmedqa"}]}}


def test_a_sweeps_select_with_subset_trains_the_variants_but_not_the_winners_final_run(tmp_path):
    from finetune import sweep

    chosen = sweep.plan("real/legal", [f"sweep.output_dir={tmp_path}/{{name}}-sweep"], [])
    assert [v["recipe"].data.sources[0].limit for v in chosen["variants"]] == [120, 120]
    final = sweep._variant_recipe(chosen["final"]["data"], "real/legal", [], "final", tmp_path / "final")
    assert final.data.sources[0].limit == 480  # the recipe's own limit, not the selection subset


@pytest.mark.parametrize(
    ("grid", "line"),
    [
        (
            "train.lerning_rate=1e-4,2e-4",
            "{recipe} (sources=1,lerning_rate=1e-4): train.lerning_rate: unknown key (did you mean 'learning_rate'?)",
        ),
        ("train.epochs=one,two", "{recipe} (sources=1,epochs=one): train.epochs: expected a number, got 'one'"),
        ("train.epochs=", "--grid 'train.epochs=': expected KEY=V1,V2 (e.g. train.learning_rate=1e-4,2e-4)"),
    ],
)
def test_a_bad_sweep_grid_is_one_line_exit_2_and_nothing_is_written(grid, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "real/medical", "--grid", grid]) == 2
    recipe_file = PROJECT / "recipes" / "real" / "medical.yaml"
    assert capsys.readouterr().err == f"error: {line.format(recipe=recipe_file)}\n"
    assert list(tmp_path.iterdir()) == []
