"""Bad input across the CLI and the config, against a finished study: each case exits with
code 2 and one line on stderr naming the value and what is allowed, no traceback, and the
study's database stays byte for byte as it was."""


import pytest

from lambda_search.cli import main

from conftest import write_config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input")
    path = write_config(folder, lambdas="[1e-2]", samples=36, epochs=1)
    assert main(["search", str(path)]) == 0
    (folder / "junk.db").write_bytes(b"this is not a database, it is a text file\n" * 50)
    (folder / "broken.toml").write_text("[train\nepochs = 2\n")
    (folder / "adir.toml").mkdir()
    (folder / "cifar.toml").write_text(f'[search]\nlambdas = [1e-3]\n[data]\ndataset = "cifar10"\n'
                                       f'root = "{folder / "nodata"}"\n[train]\nepochs = 1\n')
    return folder


DB = "sqlite:///{tmp}/tiny.db"
CASES = [
    # lambdas: zero, negative, NaN, infinite, empty, wrong type
    (
        ["search", "{tmp}/tiny.toml", "--set", "search.lambdas=[0.0]"],
        "every lambda must be a finite number > 0, got search.lambdas entry 0.0",
    ),
    (["search", "{tmp}/tiny.toml", "--set", "search.lambdas=[-1e-4]"], "got search.lambdas entry -0.0001"),
    (["search", "{tmp}/tiny.toml", "--set", "search.lambdas=[nan]"], "got search.lambdas entry nan"),
    (["search", "{tmp}/tiny.toml", "--set", "search.lambdas=[inf]"], "got search.lambdas entry inf"),
    (["search", "{tmp}/tiny.toml", "--set", "search.lambdas=[]"], "search.lambdas must be a non-empty list"),
    (
        ["search", "{tmp}/tiny.toml", "--set", 'search.lambdas=["big"]'],
        "search.lambdas must be a non-empty list of numbers",
    ),
    # wrong types and ranges
    (
        ["search", "{tmp}/tiny.toml", "--set", "train.epochs=two"],
        "train.epochs must be an integer >= 1, got train.epochs='two'",
    ),
    (["search", "{tmp}/tiny.toml", "--set", "train.lr=nan"], "train.lr must be a finite number > 0, got train.lr=nan"),
    (["search", "{tmp}/tiny.toml", "--set", "train.pack=0"], "train.pack must be 'auto' or an integer >= 1"),
    (["search", "{tmp}/tiny.toml", "--set", "search.baseline=yes"], "search.baseline must be true or false"),
    # folds below 2, above the smallest class count
    (["search", "{tmp}/tiny.toml", "--set", "data.folds=1"], "data.folds must be an integer >= 2, got data.folds=1"),
    (
        ["search", "{tmp}/tiny.toml", "--set", "data.folds=13"],
        "data.folds must be <= the smallest class count (9), got data.folds=13",  # of 28: 8 held out for the test
    ),
    # unknown keys, sections, models, data sets, subcommands
    (["search", "{tmp}/tiny.toml", "--set", "train.epoch=3"], "unknown key train.epoch; valid keys in [train]"),
    (["search", "{tmp}/tiny.toml", "--set", "trian.epochs=3"], "unknown section [trian]; valid sections"),
    (["search", "{tmp}/tiny.toml", "--set", "model.name=resnet21"], "model.name must be one of resnet20"),
    (["search", "{tmp}/tiny.toml", "--set", "data.dataset=mnist"], "'mnist'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["search", "{tmp}/tiny.toml", "--set", "epochs=3"], "--set takes section.key=value"),
    # malformed, missing, unreadable files; unwritable outputs
    (["search", "{tmp}/broken.toml"], "broken.toml"),
    (["search", "{tmp}/missing.toml"], "does not exist"),
    (["search", "{tmp}/adir.toml"], "adir.toml"),
    (["export", "--storage", DB, "--study", "tiny", "-o", "{tmp}/no/such/folder/out.csv"], "out.csv"),
    (["plot", "--storage", DB, "--study", "tiny", "-o", "{tmp}/fig.xyz"], "fig.xyz"),
    (["search", "{tmp}/cifar.toml"], "cannot read data set 'cifar10' from root='{tmp}/nodata'"),
    # studies and storages
    (["status", "--storage", DB, "--study", "nope"], "no study named 'nope'"),
    (
        ["resume", "--storage", DB, "--study", "tiny", "--set", "train.epochs=9"],
        "a stored study's config can only change where and how fast it runs",
    ),
    (["search", "{tmp}/tiny.toml", "--set", "train.lr=0.2"], "train.lr"),
    (["status", "--storage", "sqlite:///{tmp}/none.db", "--study", "tiny"], "no database file"),
    (["status", "--storage", "sqlite:///{tmp}/junk.db", "--study", "tiny"], "is not an SQLite database"),
    (["status", "--storage", "mysql://u:hunter2@h/db", "--study", "tiny"], "unsupported storage URL scheme 'mysql'"),
    (["status", "--storage", "not a url", "--study", "tiny"], "not a url"),
    (["worker", "--storage", DB, "--study", "tiny", "--device", "cuda"], "GPU"),
    # CLI flags
    (["search", "{tmp}/tiny.toml", "--workers", "0"], "must be 'auto' or an integer >= 1, got '0'"),
    (["bench", "--loader-workers", "-1"], "-1"),
    (["select", "--storage", DB, "--study", "tiny", "--prefer", "middle"], "invalid choice: 'middle'"),
    (["evaluate", "--storage", DB, "--study", "tiny", "--seeds", "0"], "argument --seeds: must be an integer >= 1"),
    (["models", "--num-classes", "0"], "argument --num-classes: must be an integer >= 1, got '0'"),
    (["studies", "--storage", "sqlite:///{tmp}/junk.db"], "is not an SQLite database"),
    (["delete", "--storage", DB, "--study", "tiny:final"], "is a companion of study 'tiny': delete it with --study"),
    (["delete", "--storage", DB, "--study", "tiny"], "no one can answer here: give --yes to delete without asking"),
    (["search", "{tmp}/tiny.toml", "--set", "study.name='no way'"], "study.name must be a name of letters, digits"),
    # a Slurm job array: what its tasks could not share, values Slurm would not take
    (["submit", "search", "{tmp}/tiny.toml", "--tasks", "2"], "SQLite is one machine's database"),
    (["submit", "search", "{tmp}/tiny.toml", "--tasks", "0"], "argument --tasks: must be an integer >= 1, got '0'"),
    (["submit", "resume", "--storage", DB, "--study", "tiny", "--tasks", "2", "--node", "n1", "--time", "25h"],
     "--time must be one of Slurm's time formats"),
    (["submit", "search", "{tmp}/tiny.toml", "--tasks", "2", "--node", "n1", "--mem", "lots"], "got 'lots'"),
    (["submit", "search", "{tmp}/tiny.toml", "--tasks", "2", "--node", "n1", "--time", "5", "--warn-seconds", "600"],
     "--warn-seconds 600 must be shorter than the time limit (--time 5: 300 s)"),
    (["submit", "evaluate", "--storage", DB, "--study", "nope", "--tasks", "2", "--node", "n1"],
     "no study named 'nope'"),
    (["submit", "resume", "--storage", DB, "--study", "tiny:final", "--tasks", "2", "--node", "n1"], "tiny:final"),
    (["submit", "search", "{tmp}/tiny.toml", "--tasks", "2", "--node", "n1", "--logs", "{tmp}/my logs"],
     "--logs must hold no space, '#', '%', quote or backslash"),
    (["submit", "search", "{tmp}/tiny.toml", "--tasks", "2", "--node", "n1", "--sbatch", "constraint=a100"],
     "--sbatch takes an sbatch option such as --constraint=a100, got 'constraint=a100'"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[-2:]) for a, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(study, capsys, args, message):
    db = study / "tiny.db"
    before = db.read_bytes()
    args = [a.format(tmp=study) for a in args]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message.format(tmp=study) in lines[0], err
    assert "hunter2" not in out + err
    assert db.read_bytes() == before
    assert not (study / "nodata").exists() and not (study / "none.db").exists()


def test_every_command_and_every_config_section_has_a_case():
    """The cases cover every command of the CLI and every section of a config (a new one
    must bring its bad input here)."""
    from lambda_search.cli.commands import COMMANDS
    from lambda_search.config import SECTIONS

    commands = {args[0] for args, _ in CASES}
    assert set(COMMANDS) <= commands, sorted(set(COMMANDS) - commands)
    sections = {a.split("=")[0].split(".")[0] for args, _ in CASES for a in args if "=" in a and "." in a.split("=")[0]}
    assert set(SECTIONS) <= sections, sorted(set(SECTIONS) - sections)
