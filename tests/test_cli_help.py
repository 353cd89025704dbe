"""`nnunet-ext --help` and every `nnunet-ext CMD --help` answer without importing torch (issue 18, item 6): the
top-level parser lists the commands from ``cli.COMMANDS`` and imports only the module of the command being run."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys

import pytest

from nnunet_ext.cli import COMMAND_MODULES, COMMANDS, Parser, build_parser, main


def registered_by(module: str) -> dict[str, str]:
    """The top-level commands ``module.add_parser`` registers, with their help."""
    parser = Parser(prog="nnunet-ext")
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(f"nnunet_ext.{module}").add_parser(sub)
    return {action.dest: action.help for action in sub._choices_actions}


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_the_command_table_matches_what_each_module_registers(module):
    table = {name: text for name, (owner, text) in COMMANDS.items() if owner == module}
    assert registered_by(module) == table


def sub_commands(parser, prefix=()):
    """Every command path below ``parser`` (e.g. ('plans', 'show')), depth first."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from sub_commands(child, (*prefix, name))


def every_command_path() -> list[tuple[str, ...]]:
    paths = []
    for name in COMMANDS:
        paths += [p for p in sub_commands(build_parser(name)) if p[0] == name]
    return paths


HELP_PROBE = """
import json, sys
from nnunet_ext.cli import main
results = {}
for path in json.loads(sys.argv[1]):
    try:
        results[" ".join(path)] = main([*path, "--help"])
    except SystemExit as stop:
        results[" ".join(path)] = stop.code
print(json.dumps({"codes": results, "heavy": sorted(m for m in ("torch", "nnunetv2", "SimpleITK") if m in sys.modules)}))
"""


def probe(paths: list[tuple[str, ...]]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, json.dumps(paths)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_top_level_help_imports_no_command_module():
    result = probe([()])
    assert result == {"codes": {"": 0}, "heavy": []}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from nnunet_ext.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('nnunet_ext.') and m != 'nnunet_ext.cli'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # the error type (and its docstring-only package) is all the top level needs besides cli.py
    loaded = set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    assert loaded <= {"nnunet_ext.core", "nnunet_ext.core.errors"}


def test_every_command_help_answers_without_torch():
    paths = every_command_path()
    assert ("medseqft", "run") in paths and ("plans", "show") in paths and ("predict",) in paths
    for name in COMMANDS:
        result = probe([p for p in paths if p[0] == name])
        assert set(result["codes"].values()) == {0}, (name, result)
        assert result["heavy"] == [], f"`nnunet-ext {name} --help` imported {result['heavy']}"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for name, (_, text) in COMMANDS.items():
        assert name in out and text[:40] in " ".join(out.split())


def test_a_wrong_command_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluat", "x"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and len(err.splitlines()) == 1
    assert "invalid choice: 'evaluat'" in err and "--help" in err


def test_a_command_runs_with_only_its_module_registered(capsys):
    assert main(["trainer-dir"]) == 0
    with pytest.raises(SystemExit):
        main(["plans", "presets", "--help"])
    assert "usage: nnunet-ext plans presets" in capsys.readouterr().out


def every_parser():
    """(command path, parser) for every command and sub-command."""
    for name in COMMANDS:
        top = build_parser(name)
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        stack = [((name,), sub.choices[name])]
        while stack:
            path, parser = stack.pop()
            yield path, parser
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack += [((*path, n), c) for n, c in action.choices.items()]


def arguments():
    for path, parser in every_parser():
        for action in parser._actions:
            if action.__class__.__name__ not in ("_SubParsersAction", "_HelpAction", "_VersionAction"):
                yield " ".join(path), action


def test_every_argument_has_a_help_text():
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in arguments() if not a.help]
    assert not missing, missing


# nnU-Net's spelling of an option, next to ours where both exist (ours stays as an alias)
NNUNET_SPELLINGS = {
    "--device": "-device",
    "--disable-tta": "--disable_tta",
    "--step-size": "-step_size",
    "--trainer": "-tr",
    "--checkpoint": "-chk",
    "--configuration": "-c",
    "--plans": "-p",
    "--folds": "-f",
    "--fold": "-f",
    "--id": "-d",
    "--dataset": "-d",
}


def test_options_take_nnunets_spelling_and_f_only_means_folds():
    wrong = []
    for path, action in arguments():
        options = action.option_strings
        if "-f" in options and action.dest not in ("fold", "folds"):
            wrong.append(f"{path}: -f means {action.dest}; nnU-Net's -f is the fold")
        for ours, theirs in NNUNET_SPELLINGS.items():
            if ours in options and theirs not in options:
                wrong.append(f"{path}: {ours} without nnU-Net's {theirs}")
    assert not wrong, wrong
