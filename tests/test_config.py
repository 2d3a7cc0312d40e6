from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from tests.helpers import REPO

MINIMAL = {"build": "b", "out_dir": "out", "inputs": [{"url": "x.fasta.gz"}]}


@pytest.mark.parametrize("name", ["sample.yaml", "uniprot.yaml", "uniref.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "config" / name)
    assert cfg.inputs
    assert cfg.raw_path(cfg.inputs[0]).parent == Path(cfg.out_dir) / "raw"


def test_defaults_are_filled_in() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.ingest.on_error == "fail"
    assert cfg.download.retries == 5
    assert cfg.inputs[0].file_name == "x.fasta.gz"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.chunk_size: unknown key"):
        parse_config({**MINIMAL, "ingest": {"chunk_size": 10}})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"download\.retries: Input should be a valid integer"):
        parse_config({**MINIMAL, "download": {"retries": "many"}})


def test_bad_choice_and_missing_key() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.on_error") as err:
        parse_config({"build": "b", "inputs": [{"url": "a"}], "ingest": {"on_error": "ignore"}})
    assert "out_dir" in str(err.value)


@pytest.mark.parametrize(("section", "message"), [
    ({"decontaminate": [{"name": "a", "url": "x.fa"}, {"name": "a", "url": "y.fa"}]},
     r"set names must be unique"),
    ({"decontaminate": [{"name": "a b", "url": "x.fa"}]}, r"decontaminate\.0\.name"),
    ({"decontaminate": [{"name": "a", "url": "x.fa", "identity": 1.5}]},
     r"decontaminate\.0\.identity"),
    ({"split": {"pin_lists": [{"path": "p.txt", "split": "holdout"}]}},
     r"split\.pin_lists\.0\.split"),
    ({"decontaminate": [{"name": "a", "url": "ftp://h/x.fa"}]},
     r"decontaminate\.0\.url: .*unsupported URL scheme 'ftp'"),
    ({"inputs": [{"url": "s3://bucket/x.fa"}]}, r"inputs\.0\.url: .*unsupported URL scheme"),
], ids=["duplicate-set", "set-name", "identity", "pin-split", "set-scheme", "input-scheme"])
def test_decontaminate_and_pin_list_errors_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**MINIMAL, **section})


def test_evaluation_sets_default_to_the_50_80_rule() -> None:
    cfg = parse_config({**MINIMAL, "decontaminate": [{"name": "pg", "url": "https://h/x.fa?a=1"}]})
    item = cfg.decontaminate[0]
    assert (item.identity, item.coverage, item.file_name) == (0.5, 0.8, "pg-x.fa")


def test_duplicate_input_names_rejected() -> None:
    cfg = {**MINIMAL, "inputs": [{"url": "a/x.fa"}, {"url": "b/x.fa"}]}
    with pytest.raises(ConfigError, match=r"repeated: x\.fa"):
        parse_config(cfg)


def test_cli_reports_config_error_in_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("build: b\nout_dir: o\ninputs: [{url: a}]\nthreads: two\n")
    assert main(["show-config", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"esm2-data: error: {bad}: invalid config: threads:")


def test_cli_missing_and_invalid_yaml(tmp_path: Path, capsys) -> None:
    assert main(["show-config", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read config" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("build: [unclosed\n")
    assert main(["show-config", "--config", str(broken)]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_show_config_into_a_closed_pipe_is_quiet() -> None:
    """`esm2-data show-config --config C | head` : the reader leaves early, no traceback."""
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "show-config", "--config",
                             str(REPO / "config" / "sample.yaml")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


def test_cluster_source_and_input_roles_agree(tmp_path) -> None:
    from pipeline.config import parse_config

    base = {"build": "b", "out_dir": str(tmp_path)}
    xml = {"url": "uniref50.xml.gz", "role": "uniref50_xml"}
    fasta = {"url": "uniref90.fasta.gz"}
    cfg = parse_config({**base, "inputs": [xml, fasta], "cluster": {"source": "uniref"}})
    assert [f.file_name for f in cfg.fasta_inputs] == ["uniref90.fasta.gz"]
    assert cfg.split.link_identity is None  # no linking by default for this source
    linked = parse_config({**base, "inputs": [xml, fasta], "cluster": {"source": "uniref"},
                           "split": {"link_method": "search"}})
    assert linked.split.link_identity == 0.5 and linked.split.link_method == "search"
    assert parse_config(MINIMAL).split.link_identity == 0.5  # the MMseqs2 source links
    assert cfg.uniref_xml == tmp_path / "raw" / "uniref50.xml.gz"
    with pytest.raises(ConfigError, match="needs exactly one input with role uniref50_xml"):
        parse_config({**base, "inputs": [fasta], "cluster": {"source": "uniref"}})
    with pytest.raises(ConfigError, match=r"which only cluster\.source: uniref reads"):
        parse_config({**base, "inputs": [xml, fasta]})
    with pytest.raises(ConfigError, match="no FASTA input"):
        parse_config({**base, "inputs": [xml], "cluster": {"source": "uniref"}})
