"""Every command the README shows is one the tools accept."""

import json
import re
import shlex
from pathlib import Path

import pytest

from din_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands(prefix: str) -> list[str]:
    lines = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README, flags=re.S):
        lines += [ln.split("#")[0].strip() for ln in block.splitlines()
                  if ln.strip().startswith(prefix)]
    # Plus the full commands of the stage table (prose mentions are fragments, not commands).
    for row in (ln for ln in README.splitlines() if ln.startswith("|")):
        lines += re.findall(rf"`({re.escape(prefix)}[^`]*)`", row)
    return sorted(set(lines))


def test_first_lines_give_the_two_commands():
    first = README.split("```")[1]
    assert "make demo" in first and "make test" in first
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", readme_commands("din-ray "))
def test_din_ray_commands_parse(command):
    args = shlex.split(command)[1:]
    if args[-1].endswith("--help") or "SOURCE" in args:
        return
    build_parser().parse_args(args)  # argparse exits on anything it does not accept


def test_curl_example_is_a_valid_request_body():
    body = re.search(r"-d '(\{.*?\})'", README, flags=re.S).group(1)
    request = json.loads(body)
    assert set(request) <= {"user", "history", "candidates", "context", "explain"}
    assert len(request["history"]["item_id"]) == len(request["history"]["cate_id"])


def test_linked_files_exist():
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in link:
            assert (ROOT / link).exists(), link
