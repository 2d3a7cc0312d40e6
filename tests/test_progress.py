"""Progress reporting: tqdm bars on a terminal (or forced), log lines elsewhere, nothing when
turned off."""

from __future__ import annotations

import logging

from pipeline.progress import LogProgress, byte_bar, format_sizeof, progress_bar


def _work(bar) -> None:
    with bar:
        for _ in range(3):
            bar.update(1024)
        bar.set_postfix_str("3 chunks")


def test_progress_off_writes_nothing(monkeypatch, caplog, capsys):
    monkeypatch.setenv("ESM2_PROGRESS", "0")
    monkeypatch.setenv("ESM2_PROGRESS_INTERVAL", "0")
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    bar = progress_bar(desc="ingest x.fasta", unit=" seq")
    assert isinstance(bar, LogProgress)
    _work(bar)
    assert bar.n == 3072
    assert caplog.records == []
    assert capsys.readouterr().err == ""


def test_off_a_terminal_progress_is_log_lines(monkeypatch, caplog):
    monkeypatch.delenv("ESM2_PROGRESS", raising=False)
    monkeypatch.setenv("ESM2_PROGRESS_INTERVAL", "3600")
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    _work(byte_bar(total=4096, desc="download x.gz"))  # pytest's stderr is not a terminal
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("download x.gz: done 3.00k/4.00k B (75%)")
    assert line.endswith("[3 chunks]")


def test_forced_bars_are_tqdm(monkeypatch, capsys):
    from tqdm.auto import tqdm

    monkeypatch.setenv("ESM2_PROGRESS", "1")
    bar = progress_bar(desc="shards", total=3)
    assert isinstance(bar, tqdm)
    _work(bar)
    assert "shards" in capsys.readouterr().err
    assert format_sizeof(3 << 20, divisor=1024) == "3.00M"
