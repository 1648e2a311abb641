"""The linearizability checker against the shared corpus with known verdicts.

The corpus is part of the project's test contract: if it is missing the test fails
(it does not skip). ``KVCLUSTER_LINCHECK_CORPUS`` overrides its location.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jepsen_lite.corpus import (
    CORPUS_ENV,
    CorpusError,
    check_corpus_file,
    corpus_dir,
    load_corpus_file,
    load_verdicts,
    parse_etcd_log,
    parse_kv_log,
)
from jepsen_lite.history import pairs, validate

VENDORED = Path(__file__).resolve().parent / "lincheck-corpus"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "lincheck-corpus"  # beside the repo


def test_every_corpus_file_gets_its_expected_verdict(
    record_property: Callable[[str, object], None],
) -> None:
    directory = corpus_dir()
    try:
        entries = load_verdicts(directory)
    except CorpusError as e:
        pytest.fail(f"the linearizability corpus is required: {e}")
    listed = {e.name for e in entries}
    on_disk = {
        f"{p.parent.name}/{p.name}"
        for sub in ("jepsen", "kv")
        for p in (directory / sub).glob("*")
        if p.is_file()
    }
    assert listed == on_disk, "VERDICTS.tsv and the corpus files disagree"
    assert len(entries) >= 100
    assert {e.linearizable for e in entries} == {True, False}

    mismatches: list[str] = []
    timings: list[tuple[float, str]] = []
    for entry in entries:
        start = time.monotonic()
        result = check_corpus_file(entry, max_steps=None, time_limit_s=60.0)
        elapsed = time.monotonic() - start
        timings.append((elapsed, entry.name))
        assert result.op_count > 0, entry.name
        if result.valid is not entry.linearizable:
            mismatches.append(
                f"{entry.name}: expected {entry.linearizable}, got {result.valid!r} "
                f"({result.steps} steps, {elapsed:.2f}s)"
            )
    slowest_time, slowest = max(timings)
    total = sum(t for t, _ in timings)
    record_property("slowest_corpus_file", slowest)
    record_property("slowest_corpus_seconds", round(slowest_time, 3))
    print(f"\ncorpus: {len(entries)} files in {total:.2f}s; slowest {slowest} {slowest_time:.3f}s")
    assert not mismatches, "\n".join(mismatches)
    assert slowest_time < 30.0, f"{slowest} took {slowest_time:.1f}s"


def test_corpus_location_can_be_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path))
    assert corpus_dir() == tmp_path.resolve()
    with pytest.raises(CorpusError, match=f"VERDICTS.tsv does not exist.*{CORPUS_ENV}"):
        load_verdicts()
    (tmp_path / "VERDICTS.tsv").write_text("file\tlinearizable\njepsen/x.log\tmaybe\n")
    with pytest.raises(CorpusError, match=r"VERDICTS\.tsv:2"):
        load_verdicts()
    monkeypatch.delenv(CORPUS_ENV)
    # the shared copy beside the repo when there is one, else the vendored one
    expected = SHARED if (SHARED / "VERDICTS.tsv").is_file() else VENDORED
    assert corpus_dir() == expected
    assert (expected / "VERDICTS.tsv").is_file()


def test_vendored_corpus_is_the_shared_one_unmodified() -> None:
    files = sorted(p.relative_to(VENDORED) for p in VENDORED.rglob("*") if p.is_file())
    assert len(files) > 100 and Path("VERDICTS.tsv") in files
    if not SHARED.is_dir():
        pytest.skip(f"no shared corpus at {SHARED} to compare with")
    for rel in files:
        assert (VENDORED / rel).read_bytes() == (SHARED / rel).read_bytes(), rel


def test_etcd_log_parser() -> None:
    lines = [
        "some noise line",
        "INFO  jepsen.util - 0\t:invoke\t:read\tnil",
        "INFO  jepsen.util - 1   :invoke :write  3",  # spaces instead of tabs
        "INFO  jepsen.util - 2\t:invoke\t:cas\t[3 4]",
        "INFO  jepsen.util - 0\t:ok\t:read\tnil",
        "INFO  jepsen.util - 1\t:info\t:write\t:timed-out",
        "INFO  jepsen.util - 2\t:fail\t:cas\t[3 4]",
        "INFO  jepsen.util - 3\t:invoke\t:read\tnil",
        "INFO  jepsen.util - 3\t:ok\t:read\t3",
        "INFO  jepsen.util - 4\t:invoke\t:read\tnil",
        "INFO  jepsen.util - 4\t:fail\t:read\t:timed-out",
    ]
    history = parse_etcd_log(lines)
    validate(history)
    assert [(op.type, op.f, op.value) for op in history] == [
        ("invoke", "read", None),
        ("invoke", "write", 3),
        ("invoke", "cas", [3, 4]),
        ("ok", "read", None),
        ("info", "write", 3),
        ("fail", "cas", [3, 4]),
        ("invoke", "read", None),
        ("ok", "read", 3),
        ("invoke", "read", None),
        ("fail", "read", None),
    ]
    assert history[4].extra == {"error": "timed-out"}
    assert [op.time for op in history[:2]] == [2, 3]  # line numbers
    with pytest.raises(CorpusError, match="completion without invocation"):
        parse_etcd_log(["INFO  jepsen.util - 7\t:ok\t:read\t1"], source="x.log")


def test_kv_log_parser() -> None:
    lines = [
        '{:process 0, :type :invoke, :f :put, :key "1", :value "x 0 0 y"}',
        '{:process 1, :type :invoke, :f :get, :key "1", :value nil}',
        '{:process 1, :type :ok, :f :get, :key "1", :value ""}',
        '{:process 0, :type :ok, :f :put, :key "1", :value "x 0 0 y"}',
        '{:process 0, :type :invoke, :f :append, :key "a\\"b", :value "q\\\\"}',
        '{:process 0, :type :ok, :f :append, :key "a\\"b", :value "q\\\\"}',
    ]
    history = parse_kv_log(lines)
    assert [(op.type, op.f, op.key, op.value) for op in history] == [
        ("invoke", "put", "1", "x 0 0 y"),
        ("invoke", "get", "1", None),
        ("ok", "get", "1", ""),
        ("ok", "put", "1", "x 0 0 y"),
        ("invoke", "append", 'a"b', "q\\"),
        ("ok", "append", 'a"b', "q\\"),
    ]
    assert len(pairs(history)) == 3
    with pytest.raises(CorpusError, match=r"kv\.txt:1"):
        parse_kv_log(['{:process 0, :type :invoke, :f :get, :key "1" :value}'], source="kv.txt")


def test_corpus_files_parse_into_valid_histories() -> None:
    entries = load_verdicts()
    kinds = {e.name.split("/")[0] for e in entries}
    assert kinds == {"jepsen", "kv"}
    for entry in entries[:: max(1, len(entries) // 12)]:
        history = load_corpus_file(entry.path, entry.name)
        validate(history)
        assert len(history) > 10
