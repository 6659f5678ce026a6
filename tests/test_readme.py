"""The README's examples work as shown: every Python block runs as a script, and every `meshtron` command line
in a shell block parses with the CLI's own parser (so no flag in the README is stale)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def _commands():
    """`meshtron ...` invocations in the shell blocks, continuation lines joined, env prefixes and comments cut."""
    out = []
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if words and words[0] in (".venv/bin/meshtron", "meshtron"):
                out.append(words[1:])
            elif words[:3] == ["torchrun"] + words[1:3] and "meshtron" in words:
                out.append(words[words.index("meshtron") + 1:])
    return out


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path):
    """Run from a folder where `runs/demo` exists (as after `make demo`; here a 2-step run) if the block uses it."""
    script = tmp_path / f"readme_{index}.py"
    script.write_text(PYTHON[index])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if "runs/demo" in PYTHON[index]:
        subprocess.run([sys.executable, "-m", "meshtron", "train", "--model", "gpt-tiny", "--steps", "2",
                        "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--out", "runs/demo"],
                       cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README python block {index} failed:\n{PYTHON[index]}\n{done.stderr[-3000:]}"


def test_every_meshtron_command_in_the_readme_parses():
    from meshtron.cli import build_parser
    commands = _commands()
    assert len(commands) >= 10, commands
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README command does not parse: meshtron {shlex.join(argv)} (exit {e.code})")
