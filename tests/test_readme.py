"""The README speaks to a user who cloned the project, and lists what ships."""
import glob
import os
import re

from conftest import REPO


def _readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_shipped_config_is_listed():
    text = _readme()
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        name = f"configs/{os.path.basename(path)}"
        assert f"`{name}`" in text, f"README does not list {name}"


def test_no_development_folders_or_process():
    text = _readme()
    for pattern in (r"\.\./shared", r"DESIGN\.md", r"these machines", r"\bthe \w+ issue\b"):
        assert not re.search(pattern, text), f"README mentions {pattern!r}"


def test_readme_commands_exist():
    """Every `fastcnn <command>` the README shows is a real command."""
    from click.testing import CliRunner

    from fastcnn.cli import cli

    commands = set(re.findall(r"^fastcnn (\w+)", _readme(), flags=re.M))
    assert {"train", "eval", "bench"} <= commands
    for command in sorted(commands):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0, f"fastcnn {command} --help: {result.output}"
