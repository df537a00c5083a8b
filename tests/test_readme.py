"""The README's API examples, run top to bottom with bash and curl against a fresh
``clickagg serve``, answer what the README says they answer.

Conventions (the README's API section states them briefly):

* An example is a shell command in a ```bash block of the "## API" section (a command
  runs on while its quotes are open or its line ends with ``\\`` or ``|``). Variables it
  sets (``NOW=$(date +%s)``) hold for the examples after it.
* ``# → STATUS BODY`` after a curl example documents its answer; lines right after it
  that start with ``#`` and two spaces continue it. Every curl example documents one.
* A JSON body is compared structurally: ``...`` as a value is any value, ``...`` among an
  object's members allows more members, ``...`` closing an array allows more items; a
  string ending in ``...`` is a prefix; an ISO-8601 UTC time stands for any such time
  (the examples' events happen "now"). Anything else must be equal.
* A text body (``/metrics``) is a list of lines that must each be a line of the answer.
* A GET example is retried until it matches (for 30 s): the README says to wait for the
  worker, and how long that takes on a loaded machine is no part of what it documents.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clickagg.config import Settings
from tests.e2e.server import ServeProcess

README = Path(__file__).parent.parent / "README.md"
README_HOST = "localhost:8000"
ANSWER = "# → "
RETRY_S = 30.0
ANY = "\u2026any"  # what a bare ``...`` value or array item becomes
MORE = "\u2026more"  # what ``...`` among an object's members becomes
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
# curl prints the body, then a line with the status (our marker before it)
CURL = (
    "curl() { command curl --silent --show-error --max-time 30 "
    "--write-out '\\n@@%{http_code}' \"$@\"; }"
)


@dataclass
class Example:
    command: str
    answer: list[str]  # the documented answer's lines, "# → " and "#  " stripped
    line: int  # in README.md, for messages

    @property
    def status(self) -> int:
        return int(self.answer[0].split(" ", 1)[0])

    @property
    def body(self) -> str:
        return " ".join(line.strip() for line in self.answer).split(" ", 1)[1]

    @property
    def text_lines(self) -> list[str]:
        return [self.answer[0].split(" ", 1)[1].strip()] + [x.strip() for x in self.answer[1:]]

    @property
    def is_get(self) -> bool:
        return "curl" in self.command and not re.search(r"\s(-X|-d|--data\S*)\s", self.command)


def api_examples(readme: str) -> list[Example]:
    """The examples of the API section's bash blocks that hold curl commands, in order."""
    start = readme.index("\n## API\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    first_line = readme[:start].count("\n") + 2
    blocks = re.finditer(r"^```bash\n(.*?)^```$", section, re.M | re.S)
    return [
        example
        for block in blocks
        if "curl" in block.group(1)
        for example in _examples(block.group(1), first_line + section[: block.start(1)].count("\n"))
    ]


def _examples(block: str, first_line: int) -> list[Example]:
    examples: list[Example] = []
    pending: list[str] = []
    for number, line in enumerate(block.splitlines(), start=first_line):
        stripped = line.strip()
        if pending or (stripped and not stripped.startswith("#")):
            pending.append(line)
            if _complete("\n".join(pending)):
                examples.append(Example("\n".join(pending), [], number - len(pending) + 1))
                pending = []
        elif stripped.startswith(ANSWER.strip()):
            assert examples and not examples[-1].answer, f"README.md:{number}: answer to what?"
            examples[-1].answer.append(stripped.removeprefix(ANSWER.strip()).strip())
        elif line.startswith("#  ") and examples and examples[-1].answer:
            examples[-1].answer.append(line[1:].strip())
    assert not pending, f"README.md:{first_line}: a command never ends"
    return examples


def _complete(command: str) -> bool:
    if command.rstrip().endswith(("\\", "|")):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # an open quote
        return False
    return True


def json_pattern(documented: str) -> Any:
    """The documented JSON body with its ``...`` made into markers."""
    text = re.sub(r":\s*\.\.\.(?=\s*[,}])", f':"{ANY}"', documented)
    text = re.sub(r"\[\s*\.\.\.\s*\]", f'["{ANY}"]', text)
    text = re.sub(r",\s*\.\.\.\s*\]", f',"{ANY}"]', text)
    text = re.sub(r",\s*\.\.\.\s*(?=[,}])", f',"{MORE}":null', text)
    return json.loads(text)


def mismatch(pattern: Any, actual: Any, path: str = "$") -> str | None:
    """Where ``actual`` differs from the documented ``pattern`` (None: it matches)."""
    if pattern == ANY:
        return None
    if isinstance(pattern, dict):
        if not isinstance(actual, dict):
            return f"{path}: expected an object, got {actual!r}"
        documented = {k: v for k, v in pattern.items() if k != MORE}
        if set(documented) - set(actual):
            return f"{path}: missing {sorted(set(documented) - set(actual))}"
        if MORE not in pattern and set(actual) - set(documented):
            return f"{path}: undocumented {sorted(set(actual) - set(documented))}"
        for key, value in documented.items():
            if (found := mismatch(value, actual[key], f"{path}.{key}")) is not None:
                return found
        return None
    if isinstance(pattern, list):
        if not isinstance(actual, list):
            return f"{path}: expected an array, got {actual!r}"
        items = pattern[:-1] if pattern and pattern[-1] == ANY else pattern
        if len(actual) < len(items) or (items is pattern and len(actual) != len(items)):
            return f"{path}: {len(actual)} items, documented {len(pattern)}: {actual!r}"
        for n, (item, got) in enumerate(zip(items, actual, strict=False)):
            if (found := mismatch(item, got, f"{path}[{n}]")) is not None:
                return found
        return None
    if isinstance(pattern, str) and ISO_UTC.match(pattern):
        ok = isinstance(actual, str) and ISO_UTC.match(actual)
        return None if ok else f"{path}: expected an ISO-8601 UTC time, got {actual!r}"
    if isinstance(pattern, str) and pattern.endswith("..."):
        ok = isinstance(actual, str) and actual.startswith(pattern[:-3])
        return None if ok else f"{path}: expected {pattern!r}, got {actual!r}"
    if pattern != actual or type(pattern) is not type(actual):
        return f"{path}: expected {pattern!r}, got {actual!r}"
    return None


def answer_mismatch(example: Example, status: int, body: str) -> str | None:
    if status != example.status:
        return f"status {status}, documented {example.status}: {body[:500]}"
    if example.body.lstrip().startswith(("{", "[")):
        try:
            actual = json.loads(body)
        except ValueError:
            return f"not JSON: {body[:500]}"
        return mismatch(json_pattern(example.body), actual)
    lines = set(body.splitlines())
    missing = [line for line in example.text_lines if line not in lines]
    return f"lines not in the answer: {missing}" if missing else None


def test_every_curl_example_documents_its_answer() -> None:
    examples = [e for e in api_examples(README.read_text()) if "curl" in e.command]
    assert len(examples) >= 10
    for example in examples:
        assert example.answer, f"README.md:{example.line}: no `# →` answer"
        assert README_HOST in example.command, f"README.md:{example.line}"
        if example.body.lstrip().startswith(("{", "[")):
            json_pattern(example.body)  # parses


def test_the_matching_rules() -> None:
    pattern = json_pattern('{"a":1,"id":"h...","p":...,...,"l":[...],"t":"2025-01-15T10:00:00Z"}')
    actual = {"a": 1, "id": "h12", "p": 3, "x": 0, "l": [1], "t": "2030-01-01T00:00:00.5Z"}
    assert mismatch(pattern, actual) is None
    assert mismatch(pattern, actual | {"a": 2}) == "$.a: expected 1, got 2"
    assert mismatch(pattern, actual | {"id": "x"}) is not None
    assert mismatch(json_pattern('{"a":1}'), {"a": 1, "b": 2}) == "$: undocumented ['b']"
    assert mismatch(json_pattern("[1, ...]"), [1, 2]) is None
    assert mismatch(json_pattern("[1]"), [1, 2]) is not None
    assert mismatch(json_pattern('{"c":1.0}'), {"c": 1}) is not None  # a float is a float


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``clickagg serve`` as the README starts it: default settings (8 partitions), and
    the admin token its Admin examples say."""
    data_dir = tmp_path_factory.mktemp("readme") / "data"
    serve = ServeProcess(
        data_dir,
        partitions=Settings().partitions,
        extra_env={"CLICKAGG_ADMIN_TOKEN": "ops:s3cret"},
    )
    serve.start()
    try:
        yield serve
    finally:
        serve.stop()


def run(example: Example, server: ServeProcess, env: dict[str, str]) -> tuple[int, str]:
    """Run one example with bash; its variables go into ``env``. Returns curl's status and
    body (0 and the output for a command without curl)."""
    command = example.command.replace(README_HOST, f"127.0.0.1:{server.port}")
    env_file = Path(env["CLICKAGG_README_ENV"])
    script = f"set -a\n{CURL}\n{command}\nenv -0 > {shlex.quote(str(env_file))}\n"
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"README.md:{example.line}: {done.stderr}"
    env.clear()
    env.update(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    body, marker, status = done.stdout.rpartition("\n@@")
    return (int(status), body) if marker else (0, done.stdout)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's examples use curl")
def test_the_api_examples_answer_what_the_readme_says(server: ServeProcess, tmp_path: Path) -> None:
    env = {**os.environ, "CLICKAGG_README_ENV": str(tmp_path / "env")}
    for example in api_examples(README.read_text()):
        deadline = time.monotonic() + RETRY_S
        status, body = run(example, server, env)
        if not example.answer:
            continue
        while (problem := answer_mismatch(example, status, body)) is not None:
            if not example.is_get or time.monotonic() > deadline:
                raise AssertionError(f"README.md:{example.line}: {example.command}\n  {problem}")
            time.sleep(0.2)
            status, body = run(example, server, env)
