"""The command line's error boundary, through the real CLI (the `dataworth` script in a subprocess, against the
test harness's Prefect server): every
failure ends as one line `dataworth <command>: <what is wrong> — <the fix>`, the traceback goes to a log file
that line names (the terminal shows none unless --debug), only transient I/O is retried, and a run that
succeeds leaves no log file behind."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from tests.tiny import TINY_CORPUS, write_tiny_assets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
DATAWORTH = shutil.which("dataworth", path=os.path.dirname(sys.executable)) or "dataworth"

LINE = re.compile(r"^dataworth (\w+): (.+) — (.+?)(?: \(log: (.+\.log)\))?$")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), TINY_CORPUS)


@pytest.fixture(scope="module")
def api_url(harness):
    return PREFECT_API_URL.value()


@pytest.fixture
def logs(tmp_path):
    return tmp_path / "logs"


@pytest.fixture
def cli(api_url, logs, tmp_path):
    """Run `dataworth ARGS` as a user would: (exit code, stderr)."""

    def run(*args: str) -> tuple[int, str]:
        env = {
            **os.environ,
            "PREFECT_API_URL": api_url,
            "DATAWORTH_LOG_DIR": str(logs),
            "HF_HUB_OFFLINE": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("DATAWORTH_DEBUG", None)
        out = subprocess.run([DATAWORTH, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500)
        return out.returncode, out.stderr

    return run


def index_args(assets: Path, out: Path, dataset: Path | str | None = None, model: Path | str | None = None):
    return [
        "index",
        *("--model", str(model or assets / "model"), "--dataset", str(dataset or assets / "docs.jsonl")),
        *("--id-column", "id", "--index", str(out / "index"), "--max-length", "16", "--proj-dim", "4"),
        *("--shard-size", "4", "--no-mlflow", "--no-progress"),
    ]


def failure(err: str, command: str) -> tuple[str, str, str | None, str]:
    """(what, fix, log path, whole stderr) of the one failure line, which must be the last line of stderr."""
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match and match.group(1) == command, last
    return match.group(2), match.group(3), match.group(4), err


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


GOOD = "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TINY_CORPUS[:4])).encode()


@pytest.mark.parametrize(
    "content, what, fix",
    [
        (GOOD + b'{"id": "x", "text": "no closing brace"\n', r"bad.jsonl', line 5: not valid JSON", "fix or remove"),
        (b"", r"bad.jsonl' is empty", "remove it"),
        (GOOD + b'{"id": "z", "text": "caf\xe9"}\n', r"bad.jsonl', line 5: bytes b'\\xe9' .* not UTF-8", "re-encode"),
    ],
    ids=["malformed-line", "empty-file", "not-utf8"],
)
def test_a_corpus_it_cannot_read_names_the_file_and_line(assets, tmp_path, logs, cli, content, what, fix):
    bad = write(tmp_path / "bad.jsonl", content)
    code, err = cli(*index_args(assets, tmp_path, dataset=bad))
    assert code == 2, err[-3000:]
    got_what, got_fix, log, _ = failure(err, "index")
    assert re.search(what, got_what) and fix in got_fix
    # The traceback went to the log file, which the line names.
    assert log and Path(log).parent == logs and "Traceback" in Path(log).read_text()


def test_a_missing_model_path_says_so(assets, tmp_path, cli):
    code, err = cli(*index_args(assets, tmp_path, model=tmp_path / "no" / "such" / "model"))
    assert code == 2, err[-3000:]
    what, fix, _, _ = failure(err, "index")
    assert "model path" in what and "does not exist" in what and "save_pretrained" in fix


def test_an_index_path_that_is_a_file_is_refused_before_any_run(assets, tmp_path, logs, cli):
    (tmp_path / "index").write_text("not an index")
    code, err = cli(*index_args(assets, tmp_path))
    err = err.strip()
    assert code == 2, err[-3000:]
    assert err.startswith("dataworth index: invalid configuration: index_uri:") and "is a file" in err, err
    assert "Traceback" not in err and not logs.exists()  # refused before a run: nothing started, no log


@pytest.mark.parametrize("flag", ["--proj-dim", "--batch-size", "--shard-size", "--max-length"])
def test_zero_sizes_are_errors(assets, tmp_path, capsys, flag):
    from flows.cli import main  # refused while building the config: no run, so in-process is the whole CLI

    assert main([*index_args(assets, tmp_path), flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dataworth index: invalid configuration:") and "greater than or equal to" in err, err


def test_debug_prints_the_traceback(assets, tmp_path, cli):
    bad = write(tmp_path / "bad.jsonl", b"")
    code, err = cli(*index_args(assets, tmp_path, dataset=bad), "--debug")
    assert code == 2, err[-3000:]
    assert "Traceback (most recent call last)" in err and "is empty" in err.strip().splitlines()[-1]


def test_a_run_that_succeeds_keeps_no_log(assets, tmp_path, logs, cli):
    code, err = cli(*index_args(assets, tmp_path))
    assert code == 0, err[-3000:]
    assert not list(logs.glob("*.log"))
