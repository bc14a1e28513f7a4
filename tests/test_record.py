"""The run record of a benchmark names the code it ran."""

import subprocess

from benchmarks import record


def test_commit_says_when_tracked_code_differs_from_it(tmp_path, monkeypatch):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (tmp_path / "core.py").write_text("x = 1\n")
    (results / "old.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = git("rev-parse", "--short", "HEAD")
    monkeypatch.delenv("SAE_WORKBENCH_COMMIT", raising=False)
    monkeypatch.setattr(record, "RESULTS", results)
    assert record._commit() == head
    (results / "old.json").write_text('{"a": 1}\n')  # results written since: still that code
    (tmp_path / "new.py").write_text("")  # untracked: not the code that ran
    assert record._commit() == head
    (tmp_path / "core.py").write_text("x = 2\n")
    assert record._commit() == head + "+changes"


def test_a_run_records_the_code_it_started_from(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(record, "_STARTED_AT", "abc1234")
    monkeypatch.setattr(record, "_commit", lambda: "def5678+changes")  # committed since
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    path = record.save("probe", {"x": 1})
    assert json.loads(path.read_text())["commit"] == "abc1234"
