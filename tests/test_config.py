"""configurator.py: config files and --key=value overrides of a script's globals."""

import pytest

from configurator import configure
from nanogpt.errors import UserError


def defaults():
    return {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "device": None,
            "out_dir": "out", "betas": (0.9, 0.95)}


def test_overrides_parse_python_literals():
    ns = defaults()
    configure(ns, ["--batch_size=32", "--learning_rate=1e-3", "--compile=False",
                   "--device=cuda:1", "--out_dir='x y'", "--betas=(0.8,0.9)"])
    assert ns == {"batch_size": 32, "learning_rate": 1e-3, "compile": False, "device": "cuda:1",
                  "out_dir": "x y", "betas": (0.8, 0.9)}


def test_booleans_in_any_case_and_bare_flags():
    ns = defaults()
    configure(ns, ["--compile=false", "--device=TRUE"])
    assert ns["compile"] is False and ns["device"] is True
    configure(ns, ["--compile"])
    assert ns["compile"] is True
    with pytest.raises(UserError, match="needs a value: --batch_size=..."):
        configure(ns, ["--batch_size"])


def test_long_plain_text_is_not_parsed_as_python():
    ns = defaults()
    prompt = "word " * 5000 + "(end"
    configure(ns, [f"--out_dir={prompt}"])
    assert ns["out_dir"] == prompt


def test_int_accepted_for_float():
    ns = defaults()
    configure(ns, ["--learning_rate=1"])
    assert ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nbatch_size = 64\nout_dir = 'from-file'\n_private = 1\n")
    ns = defaults()
    configure(ns, [str(path), "--batch_size=8"])
    assert ns["batch_size"] == 8 and ns["out_dir"] == "from-file"


@pytest.mark.parametrize("argv, words", [
    (["--batch_sise=3"], "unknown config key 'batch_sise'"),
    (["--batch_size=3.5"], "batch_size must be an int"),
    (["--compile=1"], "compile must be a bool"),
    (["--learning_rate=fast"], "learning_rate must be a float"),
    (["--batch_size"], "--batch_size=..."),
    (["no/such/config.py"], "cannot read config file"),
])
def test_bad_arguments_are_user_errors(argv, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        configure(defaults(), argv)


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("n_layers = 4\n")
    with pytest.raises(UserError, match="unknown config key 'n_layers'"):
        configure(defaults(), [str(path)])


@pytest.mark.parametrize("typed, meant", [
    ("batch_sise", "--batch_size"),  # spelled alike
    ("learning", "--learning_rate"),  # the start of a key
    ("out_dir_name", "--out_dir"),  # a key and more words
    ("comp", "--compile"),
    ("zzz", None),  # nothing near: no guess
])
def test_an_unknown_key_suggests_the_nearest(typed, meant):
    with pytest.raises(UserError) as error:
        configure(defaults(), [f"--{typed}=1"])
    message = str(error.value)
    assert message.startswith(f"unknown config key {typed!r}")
    if meant is None:
        assert "did you mean" not in message
    else:
        assert f", did you mean {meant}?" in message


def test_an_unknown_key_in_a_config_file_suggests_the_key_as_the_file_spells_keys(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("batch_sise = 4\n")
    with pytest.raises(UserError, match="did you mean batch_size\\?"):
        configure(defaults(), [str(path)])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        configure(defaults(), ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in defaults():
        assert f"--{key}" in out


@pytest.mark.parametrize("script", ["train.py", "sample.py", "chat.py"])
def test_help_says_what_each_key_does(script):
    """--help gives each knob's line the comment on the knob's line in the script, and the
    decoding flags the help engine gives them."""
    from conftest import REPO, run_script
    from nanogpt import engine
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0][2:]: line for line in result.stdout.splitlines() if line.startswith("  --")}
    with open(f"{REPO}/{script}", encoding="utf-8") as f:
        commented = {line.split("=")[0].split(":")[0].strip(): line.split("#", 1)[1].strip()
                     for line in f if "#" in line and "=" in line.split("#")[0] and line[0].islower()}
    expected = {**commented, **(engine.decoding_flag_help() if script != "train.py" else {})}
    shown = [k for k in expected if k in lines]
    assert len(shown) >= 10
    for key in shown:
        assert lines[key].endswith(expected[key]), (key, lines[key])
    if script == "chat.py":  # the flags it does not take are not listed
        assert "num_samples" not in lines and "num_beams" not in lines


def test_passed_names_the_keys_given_even_at_their_default(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("out_dir = 'out'\n")  # the default, set by the file
    settings = configure(defaults(), [str(path), "--batch_size=12", "--compile=False"])
    assert settings.passed == {"out_dir", "batch_size", "compile"}
    assert settings["compile"] is False and settings["learning_rate"] == 6e-4
    assert configure(defaults(), []).passed == set()
