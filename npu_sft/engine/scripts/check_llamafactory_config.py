"""Parse a LLaMA-Factory train config with LLaMA-Factory's own argument parser. Runs inside the ENGINE env.

    <engine-python> check_llamafactory_config.py CONFIG.yaml

Prints one JSON line: {"ok": true} or {"ok": false, "error": "..."}; exit code 0 either way, 2 on a usage error.
`get_train_args` would also refuse DeepSpeed outside torchrun, so only the parser step runs: it rejects unknown
keys and runs the dataclasses' own consistency checks (some are asserts), without loading a model or taking a
device. Two checks the parser leaves to the training are made here: HfArgumentParser.parse_dict converts no types
(`learning_rate: fast` would reach the optimizer), and the chat template is looked up only when data loads.
"""

import difflib
import json
import sys
import types
import typing

import yaml


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check_llamafactory_config.py CONFIG.yaml", file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as handle:
        config = yaml.safe_load(handle)

    # Private names in llamafactory 0.9.x; this is the one place that depends on them.
    from llamafactory.hparams.parser import _TRAIN_ARGS, _parse_train_args

    # Types first: the parser's own checks read the values (a bf16 of "maybe" is true to them) and say no key.
    problem = _type_problem(config, _TRAIN_ARGS)
    if problem is not None:
        return _refuse(problem)
    try:
        _parse_train_args(config)
    except (ValueError, TypeError) as err:
        return _refuse(str(err))
    except AssertionError as err:  # the argument classes check some values with assert
        return _refuse(str(err) or "an assertion in LLaMA-Factory's argument classes failed")
    problem = _template_problem(config)
    if problem is not None:
        return _refuse(problem)
    print(json.dumps({"ok": True}))
    return 0


def _refuse(error: str) -> int:
    print(json.dumps({"ok": False, "error": error}))
    return 0


def _type_problem(config: dict, argument_classes: list) -> "str | None":
    """The first config value of a bool, int, float or one-of field that is not one. A quoted "5e-5" or "false" is
    refused too: transformers' dict parser keeps it as text (a string learning rate, a "false" that is true)."""
    hints: dict = {}
    for arguments in argument_classes:
        try:
            hints.update(typing.get_type_hints(arguments))
        except (NameError, TypeError):  # an annotation this Python cannot resolve: that class goes unchecked
            continue
    for key, value in config.items():
        expected = _checked_type(hints.get(key))
        if expected is None or value is None:
            continue
        if isinstance(expected, tuple):
            if value not in expected:
                return f"{key}: {value!r} is not one of {', '.join(map(str, expected))}"
        elif not _fits(value, expected):
            wanted = {bool: "true or false", int: "a whole number", float: "a number"}[expected]
            if isinstance(value, str) and _fits(_unquoted(value), expected):
                return f"{key}: {value!r} is quoted, so LLaMA-Factory would get text; write it without quotes"
            return f"{key}: {value!r} is not {wanted}"
    return None


def _checked_type(hint: object) -> "type | tuple | None":
    """bool, int or float; a tuple of the allowed values of a Literal; None: not checked here."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = members[0] if len(members) == 1 else None
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return hint if hint in (bool, int, float) else None


def _fits(value: object, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected is int:
        return isinstance(value, int)
    return isinstance(value, (int, float))


def _unquoted(text: str) -> object:
    """What the text would be as a YAML 1.2 scalar: a bool, an int, a float, or the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _template_problem(config: dict) -> "str | None":
    name = config.get("template")
    if name is None:
        return None
    from llamafactory.data.template import TEMPLATES

    if name in TEMPLATES:
        return None
    close = difflib.get_close_matches(str(name), list(TEMPLATES), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(TEMPLATES)}, e.g. qwen, llama3"
    return f"template: {name!r} is not a chat template of this LLaMA-Factory{hint}"


if __name__ == "__main__":
    sys.exit(main())
