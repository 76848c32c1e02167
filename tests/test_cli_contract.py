"""The command line keeps its word, for every subcommand: generated from the parsers themselves.

For each subcommand: ``--help`` shows every flag's default and accepted values; the help example
runs as printed (at the smallest size) and writes ``settings.json`` beside its outputs; a bad
value of each typed flag exits 2 with one line naming the flag. Plus: errors speak in flags, a
failed run leaves no folder behind, ``-q`` silences progress, the README's Python block runs twice.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
from test_cli_report import assert_one_line_error, run_cli

from posprobe.cli import EXAMPLES, SETTINGS_FILE, build_parser, main, speak_in_flags, subparsers
from posprobe.progress import set_quiet

PARSERS = subparsers(build_parser())
ROOT = Path(__file__).resolve().parents[1]

#: the help examples at the smallest size: these flags are set (added when the example has none)
SMALLEST = {"--n": "6", "--seq-len": "32", "--steps": "2", "--eval-windows": "2", "--components": "3"}


def options(command: str) -> list[argparse.Action]:
    return [a for a in PARSERS[command]._actions if a.option_strings and a.dest not in ("help", "version")]


def help_blocks(command: str, capsys) -> dict[str, str]:
    """Each flag's help text (whitespace collapsed), read from the rendered ``--help``."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    section = text.split("options:", 1)[1].split("example:", 1)[0]
    blocks, current = {}, None
    for line in section.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if match:
            current = match[2]
            blocks[current] = ""
        if current:
            blocks[current] += " " + line.strip()
    return {flag: " ".join(body.split()) for flag, body in blocks.items()} | {"example:": text}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_shows_every_default_and_accepted_value(command, capsys):
    blocks = help_blocks(command, capsys)
    assert EXAMPLES[command].splitlines()[0] in blocks["example:"]
    for action in options(command):
        flag = next(o for o in action.option_strings if o.startswith("--"))
        assert flag in blocks, f"{command} {flag} is missing from --help"
        assert action.help, f"{command} {flag} has no help text"
        assert "(default:" in blocks[flag], f"{command} {flag} does not show its default: {blocks[flag]!r}"
        for choice in action.choices or ():
            assert str(choice) in blocks[flag], f"{command} {flag} does not show the accepted value {choice!r}"


def smallest(example: str) -> list[str]:
    argv = shlex.split(example.splitlines()[0])[1:]
    command = argv[0]
    flags = {o for a in options(command) for o in a.option_strings}
    for flag, value in SMALLEST.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        elif flag in flags:
            argv += [flag, value]
    if command == "report":
        argv.append("--quick")
    return argv


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_example_runs_at_the_smallest_size(command, tmp_path, monkeypatch, capsys):
    argv = smallest(EXAMPLES[command])
    monkeypatch.chdir(tmp_path)  # the example's own --out, relative to an empty folder
    try:
        code = main([*argv, "-q"])
    finally:
        set_quiet(False)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "it/s" not in captured.err and "batch/s" not in captured.err  # -q: no progress bars
    leftovers = [p.name for p in tmp_path.rglob(".*partial*")]
    assert not leftovers, leftovers
    if "--out" not in argv:
        return
    out = tmp_path / argv[argv.index("--out") + 1]
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["command"] == shlex.join(["posprobe", *argv, "-q"])
    assert settings["seed"] == 0 and settings["versions"]["torch"] and settings["versions"]["posprobe"]
    assert settings["flags"]["out"] == argv[argv.index("--out") + 1]
    if "--model" in argv:
        assert settings["models"][0]["name"], settings["models"]
    assert len(list(out.iterdir())) > 1  # outputs beside the settings


def bad_values(action: argparse.Action) -> list[str]:
    if action.choices:
        return ["not-a-choice"]
    name = getattr(action.type, "__name__", "")
    values = ["abc"]
    if name.startswith("positive"):
        values.append("0")
    if name.startswith("non-negative"):
        values.append("-1")
    if name == "fraction":
        values.append("1.5")
    return values


TYPED = [
    (command, next(o for o in a.option_strings if o.startswith("--")), bad)
    for command in sorted(PARSERS)
    for a in options(command)
    if a.type is not None or a.choices
    for bad in bad_values(a)
]


def test_every_typed_flag_is_covered():
    covered = {(c, f) for c, f, _ in TYPED}
    for flag in ("--seed", "--n", "--seq-len", "--batch-size", "--device", "--threads", "--sites", "--dtype"):
        assert ("extract", flag) in covered, flag
    assert ("train", "--pe") in covered and ("probe", "--n-splits") in covered and ("train", "--p-rope") in covered


@pytest.mark.parametrize(("command", "flag", "bad"), TYPED, ids=[f"{c} {f} {b}" for c, f, b in TYPED])
def test_a_bad_value_of_each_typed_flag_exits_2_naming_the_flag(command, flag, bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, f"{flag}={bad}", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"posprobe {command}: error: argument {flag}"), err[0]
    assert repr(bad) in err[0] or bad in err[0]
    assert not (tmp_path / "out").exists()


def test_every_flag_a_message_mentions_exists():
    """Every ``--flag`` written anywhere in posprobe's source is a flag of some subcommand."""
    known = {o for p in PARSERS.values() for a in p._actions for o in a.option_strings} | {"--version"}
    # pip's, in an install hint; torchrun's, in a launch line; analyses/zoo2_train.py's, in the zoo v2 hint
    other_tools = {"--no-deps", "--nproc-per-node", "--schemes"}
    mentioned = set()
    for path in (ROOT / "posprobe").rglob("*.py"):
        mentioned |= {m for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", path.read_text())}
    unknown = sorted(mentioned - known - other_tools)
    assert not unknown, f"messages mention flags no subcommand has: {unknown}"


# -- errors speak in flags -------------------------------------------------------------------------


def test_api_spellings_become_flags():
    extract = PARSERS["extract"]
    said = speak_in_flags(
        "runs/x holds another run (model 'm'; differs in token_hash); pass overwrite=True to replace it", extract
    )
    assert said == "runs/x holds another run (model 'm'; differs in token_hash); pass --overwrite to replace it"
    said = speak_in_flags("shard 3 is corrupt; delete it and rerun extract(..., resume=True)", extract)
    assert said == "shard 3 is corrupt; delete it and rerun with --resume"
    said = speak_in_flags("7 sequences cannot make 9 folds; lower n_splits or seq_len", PARSERS["probe"])
    assert said == "7 sequences cannot make 9 folds; lower --n-splits or --seq-len"
    said = speak_in_flags("runs/z already holds a checkpoint; pass resume=True or another out_dir", PARSERS["train"])
    assert said == "runs/z already holds a checkpoint; pass --resume or another --out"
    assert speak_in_flags("include_pos0=True is not a flag", extract) == "include_pos0=True is not a flag"


def test_too_few_windows_for_the_folds_is_said_in_flags_before_any_work(tmp_path):
    proc = run_cli("probe", "--model", "zoo:none", "--n", "4", "--out", str(tmp_path / "p"))
    assert_one_line_error(proc, "probe", "--n 4 windows cannot make --n-splits 5 folds", "lower --n-splits")
    assert "n_splits" not in proc.stderr
    assert not (tmp_path / "p").exists()


def test_store_errors_say_the_flag_and_do_not_repeat_resume(tmp_path, capsys):
    out = str(tmp_path / "s")
    small = ["--model", "zoo:rope", "--n", "2", "--seq-len", "16", "--out", out, "-q"]
    try:
        assert main(["extract", *small]) == 0
        assert main(["extract", *small]) == 0  # the same run again: reused
        capsys.readouterr()
        assert main(["extract", *small, "--seed", "1"]) == 2  # other tokens
        err = capsys.readouterr().err.strip()
        assert "holds another run" in err and "pass --overwrite to replace it" in err
        assert "overwrite=True" not in err and "CLI:" not in err
        assert main(["extract", *small, "--seed", "1", "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--resume continues only the same run" in err and "pass --overwrite" in err
        assert main(["extract", *small, "--seed", "1", "--overwrite"]) == 0
        assert json.loads((Path(out) / SETTINGS_FILE).read_text())["flags"]["seed"] == 1
    finally:
        set_quiet(False)


# -- a failed run leaves nothing behind ------------------------------------------------------------


def test_a_failed_run_leaves_no_folder_and_keeps_an_existing_one_as_it_was(tmp_path, capsys):
    assert main(["report", "--model", "does-not-exist", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    assert main(["positions", "--model", "zoo:rope", "--out", str(tmp_path / "p")]) == 2  # fails after loading
    assert not (tmp_path / "p").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["positions", "--model", "zoo:rope", "--out", str(kept)]) == 2
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    capsys.readouterr()


def test_out_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("rope", "--model", "zoo:rope", "--out", str(tmp_path / "file" / "sub"))
    assert_one_line_error(proc, "rope", "is a file, so the folder cannot be created")


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main(["extract", "--resume", "--overwrite", "--out", str(tmp_path / "s")]) == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err


# -- progress ------------------------------------------------------------------------------------------


def test_quiet_silences_progress_and_without_it_bars_show(tmp_path):
    small = ["rope", "--model", "zoo:rope", "--n", "2", "--seq-len", "16"]
    loud = run_cli(*small, "--out", str(tmp_path / "a"))
    assert loud.returncode == 0, loud.stderr
    assert "rope frequency usage" in loud.stderr
    quiet = run_cli(*small, "--out", str(tmp_path / "b"), "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout.splitlines()[-1].startswith("wrote ")


# -- the README's Python block --------------------------------------------------------------------------


def test_readme_python_block_runs_twice(tmp_path, monkeypatch):
    """The README's example, at a smaller size, run twice in one folder: the second run reuses the store."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Use from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert 'out="runs/smol"' in block
    code = block.replace("n=64", "n=6").replace("seq_len=256", "seq_len=32")
    code = code.replace('store.get("resid_post", 12)  #', 'assert store.get("resid_post", 12).shape == (6, 32, 576)  #')
    assert code != block
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        assert len(namespace["probes"].table) > 0
    assert len(list((tmp_path / "runs" / "smol").glob("shard_*"))) >= 1
