"""Startup of the `aquakv` command: help and --version without torch, a light `import aquakv`, and usage errors
as one line plus a pointer to --help (moved out of test_cli.py, which had grown past 350 lines)."""
import sys

import pytest
from aquakv import cli


def test_help_does_not_import_torch():
    """`aquakv --help` answers without importing torch or transformers (both take seconds to import)."""
    import subprocess

    code = ("import runpy, sys\nsys.argv = ['aquakv', '--help']\ntry:\n    runpy.run_module('aquakv', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: aquakv" in r.stdout
    assert "HEAVY []" in r.stderr, r.stderr


def test_import_aquakv_is_light_and_names_load_on_use():
    import subprocess

    code = ("import sys, aquakv\nassert 'torch' not in sys.modules\nq = aquakv.HiggsQuantizer(bits=2, dim=2, "
            "group_size=64)\nimport torch\nassert hasattr(torch.ops.aquakv, 'higgs_quantize')\n"
            "assert isinstance(aquakv.__version__, str) and aquakv.__version__\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("argv", [["eval", "--help"], ["--version"], ["longctx", "--help"], ["calibrate", "--help"]])
def test_subcommand_help_and_version_import_no_torch(argv):
    """`aquakv eval --help` listed the registry's availability (torch + transformers: 2-11 s); --version read the
    compiled extension. Both answer from metadata now."""
    import subprocess

    code = (f"import runpy, sys\nsys.argv = ['aquakv', *{argv!r}]\ntry:\n    runpy.run_module('aquakv', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr
    assert r.stdout.startswith("usage: aquakv" if "--help" in argv else "aquakv ")


@pytest.mark.parametrize("argv, message", [
    (["eval", "--predictors", "p", "--window", "0"], "aquakv eval: error: argument --window: must be a positive"),
    (["evl"], "aquakv: error: argument COMMAND: invalid choice: 'evl'"),
    (["calibrate", "--bits"], "aquakv calibrate: error: argument --bits: expected one argument"),
])
def test_a_usage_error_is_one_line_and_a_pointer_to_help(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.splitlines()[0].startswith(message) and "usage:" not in err
    assert err.splitlines()[1:] == [f"(see `{message.split(': error')[0]} --help`)"]
