"""Strict YAML configs, shared by recipes and eval suites: found by name or path, `extends:`, dotted overrides,
and pydantic errors turned into one line that names the file, the key and the fix (with a did-you-mean)."""

from __future__ import annotations

import copy
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from finetune.errors import FinetuneError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Section(BaseModel):
    """A strict part of a config file: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class Kind:
    """One kind of config file: what it is called, the folder its names live in, and its schema."""

    noun: str  # "recipe", "eval suite"
    folder: str  # "recipes", "evals"
    schema: type[BaseModel]
    needs: str  # what an empty file lacks, for the error line


def suggest(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_path(path: str) -> Path:
    """Data, model and config paths: relative to the current folder, else to the project."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p if (PROJECT_ROOT / p).exists() else p


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def folders(kind: Kind) -> list[Path]:
    """Where names are looked up: ./FOLDER first, then the project's own."""
    dirs = [Path.cwd() / kind.folder, PROJECT_ROOT / kind.folder]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [x.resolve() for x in dirs[:i]]]


def names(kind: Kind) -> list[str]:
    return sorted({p.stem for d in folders(kind) for p in d.glob("*.yaml")})


def find(kind: Kind, name_or_path: str, given_as: str = "") -> Path:
    """The file of a config given by name (FOLDER/NAME.yaml) or path; `given_as` names the option or key used."""
    prefix = f"{given_as} " if given_as else ""
    path = resolve_path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FinetuneError(
                f"{prefix}{name_or_path}: {kind.noun} file not found; give a path to a .yaml file or a name from "
                f"{kind.folder}/"
            )
        return path
    for d in folders(kind):
        if (d / f"{name_or_path}.yaml").is_file():
            return d / f"{name_or_path}.yaml"
    known = names(kind)
    raise FinetuneError(
        f"{prefix}{name_or_path}: no such {kind.noun}{suggest(name_or_path, known)}; "
        f"known: {', '.join(known) or 'none'} ({kind.folder}/NAME.yaml)"
    )


def _read_yaml(kind: Kind, path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown(path)}:{mark.line + 1}" if mark else shown(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FinetuneError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise FinetuneError(f"{shown(path)}: not UTF-8 text; save the {kind.noun} as UTF-8") from None
    if data is None:
        raise FinetuneError(f"{shown(path)}: the {kind.noun} is empty; it needs at least {kind.needs}")
    if not isinstance(data, dict):
        raise FinetuneError(f"{shown(path)}: a {kind.noun} is a mapping of sections, got a {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_tree(kind: Kind, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping with its `extends:` chain merged in (the file's own keys win)."""
    if path.resolve() in seen:
        raise FinetuneError(f"{shown(path)}: 'extends' forms a cycle: {' -> '.join(shown(p) for p in (*seen, path))}")
    data = _read_yaml(kind, path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        raise FinetuneError(
            f"{shown(path)}: extends: {parent} not found (paths are relative to the {kind.noun}'s folder)"
        )
    return deep_merge(load_tree(kind, parent_path, (*seen, path.resolve())), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML (so 50 is an int, [a,b] a list)."""
    # A deep copy: an override inside a list (data.sources.0.limit) must not reach the caller's mapping, which a
    # sweep reuses for every variant and for the winner's final, full training.
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FinetuneError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=50")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise FinetuneError(
                f"override {item!r}: invalid YAML value: {problem}; quote it if it is plain text"
            ) from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # data.sources.0.limit: an item of a list section
                if not part.isdigit() or int(part) >= len(node):
                    raise FinetuneError(f"override {item!r}: {part} is not an index of that list (0-{len(node) - 1})")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise FinetuneError(f"override {item!r}: {part} is not a section")
        if isinstance(node, list):
            raise FinetuneError(f"override {item!r}: {parts[-2]} is a list; name an item's key, e.g. {key}.0.limit")
        node[parts[-1]] = value
    return data


def _model_in(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The model class inside an annotation, and whether a list index or dict key stands before its fields."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    container = typing.get_origin(annotation) in (list, dict)
    for arg in typing.get_args(annotation):
        model, keyed = _model_in(arg)
        if model is not None:
            return model, container or keyed
    return None, False


def _field_names(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section holding the last key of `loc`, for the did-you-mean of an unknown key."""
    model, skip = schema, False
    for part in loc[:-1]:
        if skip:
            skip = False
            continue
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            return []
        model, skip = _model_in(field.annotation)
    return list(model.model_fields) if model is not None else []


def _model_names(schema: type[BaseModel]) -> set[str]:
    found, todo = set(), [schema]
    while todo:
        model = todo.pop()
        if model.__name__ not in found:
            found.add(model.__name__)
            todo += [m for f in model.model_fields.values() if (m := _model_in(f.annotation)[0]) is not None]
    return found


def _location(schema: type[BaseModel], error: dict) -> tuple:
    # pydantic names union branches in the location (target_modules.list[str], shots_from.ShotsSource).
    branches = _model_names(schema)
    return tuple(p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p in branches)))


def _describe(schema: type[BaseModel], error: dict) -> str:
    loc = _location(schema, error)
    where = ".".join(str(p) for p in loc) or schema.__name__.lower()
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"{where}: unknown key{suggest(str(loc[-1]), _field_names(schema, loc))}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "literal_error":
        return f"{where}: expected one of {error['ctx']['expected']}, got {got!r}"
    expected = {
        ("int_type", "int_parsing", "int_from_float"): "an integer",
        ("float_type", "float_parsing"): "a number",
        ("bool_type", "bool_parsing"): "true or false",
        ("string_type",): "a string",
        ("list_type",): "a list",
        ("dict_type", "model_type", "model_attributes_type"): "a mapping",
    }
    for kinds, text in expected.items():
        if kind in kinds:
            return f"{where}: expected {text}, got {got!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" + (f", got {got!r}" if kind.startswith(("greater", "less", "too_short")) else "")


def validate(schema: type[BaseModel], data: dict, origin: str):
    """The data as a schema instance, or one FinetuneError line naming `origin`, the first bad key and the fix."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # A union (list | 'all-linear') reports one error per branch; the first names the field well enough.
        first = _describe(schema, errors[0])
        others = len({_location(schema, error) for error in errors}) - 1
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
        raise FinetuneError(f"{origin}: {first}{more}") from None


def load(kind: Kind, name_or_path: str, overrides: list[str] = (), given_as: str = ""):
    """A config by name or path, `extends:` resolved, overrides applied, validated; `name` defaults to the file name."""
    path = find(kind, name_or_path, given_as)
    data = load_tree(kind, path)
    data.setdefault("name", path.stem)
    data = apply_overrides(data, list(overrides))
    return validate(kind.schema, data, shown(path))
