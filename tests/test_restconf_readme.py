"""The README's RESTCONF curl examples, run as written against a real server (only the port,
the state directory and the password are the test's own)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .restconf_client import start_with_restconf

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- the commands of this block are run by tests/test_restconf_readme.py -->"


def readme_commands() -> list[str]:
    text = README.read_text()
    block = text[text.index(MARKER):].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines()
            if line.strip().startswith("curl ")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server, port = start_with_restconf(tmp_path_factory.mktemp("readme"), "--sessions", "5")
    yield server, port
    server.stop()


def test_readme_has_restconf_curl_examples():
    assert len(readme_commands()) >= 6


@pytest.mark.parametrize("number", range(len(readme_commands())))
def test_readme_curl_example_succeeds(served, number):
    server, port = served
    command = readme_commands()[number]
    command = command.replace("8443", str(port)).replace("state/", f"{server.state_dir}/")
    result = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NFMIG_PASSWORD": server.password})
    status = int(result.stdout.rsplit("\n", 1)[-1])
    assert 200 <= status < 300, (command, result.stdout, result.stderr)
