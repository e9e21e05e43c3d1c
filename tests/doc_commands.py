"""The commands the docs show, read and checked against the real command lines (tests/test_docs.py): the commands
that run ``train.py``, ``python -m convert`` or ``convnext-audio`` in fenced code blocks (shell, and a Kubernetes
manifest's containers), in prose quotes that pass options, and in the configs' docstrings; their subcommands,
options, choices and ``--config.KEY``s looked up in the argparse parsers, train.py's absl flags and the config
files themselves."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import importlib.util
import pathlib
import re
import shlex
import sys

import yaml

from convnext_audio_jax import cli
from convnext_audio_jax.data import spec as spec_lib
from convnext_audio_jax.hub import convert_command
from convnext_audio_jax.training import check

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Each config's docstring shows its commands too (indented, as a code block would be).
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w-]*)")
# Usage notation, not arguments: optional brackets, repetition.
ELLIPSES = ("...", "…")
SEPARATORS = ("&&", "||", ";", "|", "&")
LAUNCHERS = ("srun", "mpirun", "mpiexec", "torchrun")  # multi-process launchers
DATA_SPEC_KEYS = ("data.train", "data.validation", "data.eval")


@dataclasses.dataclass
class Command:
    where: str  # doc:line
    program: str  # "train.py", "convert" or "convnext-audio"
    args: list[str]
    env: dict[str, str]  # assignments before the command, `export`s earlier in its block, a YAML container's env
    launcher: list[str]  # what runs the interpreter: srun, sh -c (a Kubernetes container), ...
    sbatch: dict[str, str]  # the #SBATCH options of its block
    partial: bool = False  # quoted in prose: only its subcommand, options and config keys are checked

    def __str__(self):
        return f"{self.where}: {self.program} {' '.join(self.args)}"


# --------------------------------------------------------------------------------------------- reading docs


def code_blocks(path: pathlib.Path):
    """(language, [(line number, text)]) of every fenced block, indented ones (in lists) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        index += 1
        if not match:
            continue
        indent, fence, language = match.groups()
        body = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append((index + 1, lines[index].removeprefix(indent)))
            index += 1
        index += 1
        yield language, body


def docstring_block(path: pathlib.Path):
    """The indented lines of a module's docstring, as one code block."""
    node = ast.parse(path.read_text(encoding="utf-8")).body[0]
    lines = path.read_text(encoding="utf-8").splitlines()[node.lineno - 1:node.end_lineno]
    return [(node.lineno + i, line[4:]) for i, line in enumerate(lines) if line.startswith("    ")]


def shell_lines(body):
    """(line number, text) of each logical line: lines ending in a backslash joined, as are the indented
    lines that continue a usage line (`    [--flag X] ...`); a `$ ` prompt dropped."""
    logical: list[list] = []
    continued = False
    for number, text in body:
        usage = text[:1].isspace() and text.lstrip()[:1] in ("[", "-") and logical and not continued
        if continued or usage:
            logical[-1][1] += " " + text.strip()
        else:
            logical.append([number, text.strip()])
        continued = logical[-1][1].endswith("\\")
        if continued:
            logical[-1][1] = logical[-1][1][:-1]
    for number, text in logical:
        yield number, text.strip().removeprefix("$ ")


def split_commands(tokens: list[str]) -> list[list[str]]:
    commands, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def program_of(tokens: list[str]):
    """(program, its arguments, leading VAR=value assignments, launcher) or None."""
    env, launcher = {}, []
    for index, token in enumerate(tokens):
        name = pathlib.PurePosixPath(token).name
        if name == "convnext-audio":
            return "convnext-audio", tokens[index + 1:], env, launcher
        if name == "train.py":
            return "train.py", tokens[index + 1:], env, launcher
        if token == "-m" and tokens[index + 1:index + 2] == ["convert"]:
            return "convert", tokens[index + 2:], env, launcher
        if not launcher and re.fullmatch(r"[A-Za-z_]\w*=.*", token):
            env[token.split("=", 1)[0]] = token.split("=", 1)[1]
        elif not re.fullmatch(r"(.*/)?python[\d.]*", token):
            launcher.append(token)
    return None


def commands_in(path: pathlib.Path) -> list[Command]:
    found = []
    relative = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    blocks = [("", docstring_block(path))] if path.suffix == ".py" else code_blocks(path)
    for language, body in blocks:
        if language == "python":
            continue
        if language == "yaml":
            found += yaml_commands(relative, body)
            continue
        sbatch = dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", "\n".join(text for _, text in body), re.MULTILINE))
        exported: dict[str, str] = {}
        for number, text in shell_lines(body):
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError as error:  # prose in a block (a layout tree) is fine, an unreadable command is not
                if program_of(text.split()) is not None:
                    found.append(Command(f"{relative}:{number}", "unparsable", [str(error), text], {}, [], {}))
                continue
            for command in split_commands(tokens):
                if command[0] == "export":
                    exported.update(item.split("=", 1) for item in command[1:] if "=" in item)
                elif (program := program_of(command)) is not None:
                    name, args, env, launcher = program
                    found.append(Command(f"{relative}:{number}", name, args, {**exported, **env}, launcher, sbatch))
    return found


def inline_commands(path: pathlib.Path) -> list[Command]:
    """Commands quoted in prose that pass options (`convnext-audio tag … --backend onnxruntime`)."""
    found, in_block = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_block = not in_block
        if in_block or FENCE.match(line):
            continue
        for span in re.findall(r"`([^`]+)`", line):
            try:
                tokens = shlex.split(span)
            except ValueError:
                continue
            for command in split_commands(tokens):
                program = program_of(command)
                if program is not None and any(is_option(token) for token in program[1]):
                    found.append(Command(f"{path.relative_to(REPO)}:{number}", program[0], program[1], {}, [], {},
                                         partial=True))
    return found


def yaml_commands(relative, body) -> list[Command]:
    """A Kubernetes manifest's containers: their `command` run through `sh -c`, with their `env`."""
    text = "\n".join(line for _, line in body)
    found = []
    for document in yaml.safe_load_all(text):
        for container in find_containers(document):
            command = container.get("command") or []
            if command[:2] != ["sh", "-c"]:
                continue
            number = next(n for n, line in body if "command:" in line and command[2][:40] in line)
            env = {item["name"]: str(item["value"]) for item in container.get("env", [])}
            for tokens in split_commands(shlex.split(command[2])):
                if (program := program_of(tokens)) is not None:
                    name, args, assigned, _ = program
                    found.append(Command(f"{relative}:{number}", name, args, {**env, **assigned}, ["sh", "-c"], {}))
    return found


def find_containers(node):
    if isinstance(node, dict):
        if "containers" in node:
            yield from node["containers"]
        for value in node.values():
            yield from find_containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from find_containers(value)


# ------------------------------------------------------------------------------------------ the parsers


def is_placeholder(value: str) -> bool:
    """FILE, DIR, SPEC, OUT@eval, <name>, $VAR, …: a value for the reader to fill in."""
    return bool(re.search(r"<[^>]*>|\.\.\.|…|\$|(^|[^A-Za-z])[A-Z][A-Z0-9_]*([^A-Za-z]|$)", value))


def usage_tokens(args: list[str]) -> list[str]:
    """The arguments without usage notation: [optional] brackets and … repetitions."""
    cleaned = [token.strip("[]").rstrip("…") for token in args]
    return [token for token in cleaned if token and token not in ELLIPSES]


def is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-[\d.]+", token)


@functools.cache
def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    """{"": convnext-audio's own parser, "convnext-audio SUB": each subcommand's, "python -m convert": its}."""
    top = cli.build_parser()
    (subcommands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": top, **{f"convnext-audio {name}": p for name, p in subcommands.choices.items()},
            "python -m convert": convert_command.add_arguments(argparse.ArgumentParser(prog="python -m convert"))}


@functools.cache
def train_flags() -> dict:
    """train.py's absl flags (its own and those of the libraries it imports), by name: train.py loaded as a module."""
    from absl import flags

    if "train_py_for_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_py_for_docs", REPO / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return dict(flags.FLAGS._flags())


@functools.cache
def load_config(path: str):
    return check.load_config_file(str(REPO / path))


def closest(name: str, names) -> str:
    match = difflib.get_close_matches(name, list(names), n=1, cutoff=0.0)
    return f" (closest: {match[0]})" if match else ""


def check_argparse(label: str, parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """Problems of ``tokens`` for ``parser``: unknown options, values outside an option's choices or type,
    too few or too many positional arguments."""
    problems, positionals = [], []
    options = parser._option_string_actions
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not is_option(token):
            positionals.append(token)
            continue
        name, equals, value = token.partition("=")
        action = options.get(name)
        if action is None:
            problems.append(f"`{label}` has no option {name}{closest(name, options)}")
            index += not equals and index < len(tokens) and not is_option(tokens[index])  # its value, if any
            continue
        values = [value] if equals else []
        if not equals and action.nargs != 0:
            count = 1 if action.nargs in (None, "?") else action.nargs if isinstance(action.nargs, int) else len(tokens)
            while len(values) < count and index < len(tokens) and not is_option(tokens[index]):
                values.append(tokens[index])
                index += 1
        for given in values:
            if is_placeholder(given):
                continue
            for alternative in given.split("|"):
                if action.choices is not None and alternative not in action.choices:
                    problems.append(f"`{label} {name}` takes {sorted(action.choices)}; the doc gives {alternative!r}")
                elif action.type in (int, float):
                    try:
                        action.type(alternative)
                    except ValueError:
                        problems.append(f"`{label} {name}` takes a number; the doc gives {alternative!r}")
    expected = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    least = sum(1 if a.nargs in (None, "+") else a.nargs if isinstance(a.nargs, int) else 0 for a in expected)
    most = float("inf") if any(a.nargs in ("+", "*") for a in expected) else sum(
        1 if a.nargs in (None, "?") else a.nargs for a in expected)
    if not least <= len(positionals) <= most:
        problems.append(f"`{label}` takes {least}..{most} positional arguments; the doc gives {positionals}")
    return problems


def check_convnext_audio(tokens: list[str]) -> list[str]:
    parsers = cli_parsers()
    top_options = tokens[:next((i for i, t in enumerate(tokens) if not is_option(t)), len(tokens))]
    rest = tokens[len(top_options):]
    problems = check_argparse("convnext-audio", parsers[""], top_options)
    if not rest:
        return problems + ["no subcommand"]
    label = f"convnext-audio {rest[0]}"
    if label not in parsers:
        subcommands = [name.split()[-1] for name in parsers if name.startswith("convnext-audio ")]
        return problems + [f"convnext-audio has no subcommand {rest[0]!r}{closest(rest[0], subcommands)}"]
    return problems + check_argparse(label, parsers[label], rest[1:])


def train_arguments(tokens: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """(the --config file, {override key: value}, problems with train.py's own flags)."""
    known = train_flags()
    config, overrides, problems = None, {}, []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not is_option(token):
            problems.append(f"train.py takes no positional argument; the doc gives {token!r}")
            continue
        name, equals, value = token.lstrip("-").partition("=")
        if name.startswith("config."):
            if not equals and index < len(tokens) and not is_option(tokens[index]):
                value, index = tokens[index], index + 1
            overrides[name.removeprefix("config.")] = value
            continue
        flag = known[name] if name in known else known.get(name.removeprefix("no"))  # --noBOOL
        if flag is None or (name not in known and not flag.boolean):
            problems.append(f"train.py has no flag --{name}{closest(name, known)}")
            index += not equals and index < len(tokens) and not is_option(tokens[index])  # its value, if any
            continue
        if not equals and not flag.boolean and index < len(tokens):
            value, index = tokens[index], index + 1
        if name == "config":
            config = value
    return config, overrides, problems


def check_train(tokens: list[str]) -> list[str]:
    config_file, overrides, problems = train_arguments(tokens)
    if config_file is None:
        return problems + ["no --config"]
    for key, value in overrides.items():
        if key in DATA_SPEC_KEYS and not (key == "data.validation" and spec_lib.parse_holdout(value) is not None):
            try:
                spec_lib.parse(value)
            except spec_lib.SpecError as error:
                problems.append(f"--config.{key}: {error}")
    if is_placeholder(config_file):
        return problems
    if not (REPO / config_file).is_file():
        return problems + [f"--config {config_file}: no such file"]
    config = load_config(config_file)
    for key in overrides:
        if not is_placeholder(key) and (nearest := check.unknown_key(config, key)) is not None:
            problems.append(f"{config_file} has no key {key!r} for --config.{key} (closest: {nearest})")
    return problems


def command_problems(command: Command) -> list[str]:
    tokens = usage_tokens(command.args)
    if command.program == "convnext-audio":
        problems = check_convnext_audio(tokens)
    elif command.program == "convert":
        problems = check_argparse("python -m convert", cli_parsers()["python -m convert"], tokens)
    elif command.program == "train.py":
        problems = check_train(tokens)
    else:
        return [f"cannot read the command: {' '.join(command.args)}"]
    if command.partial:  # a quote leaves out what the sentence does not need
        problems = [p for p in problems if not re.search(r"positional|^no subcommand$|^no --config$", p)]
    return problems


def doc_problems(paths) -> tuple[list[Command], list[str]]:
    commands = [command for path in paths for command in commands_in(path)
                + (inline_commands(path) if path.suffix == ".md" else [])]
    return commands, [f"{command.where}: {problem}\n    {command}" for command in commands
                      for problem in command_problems(command)]
