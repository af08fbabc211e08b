"""Every command line in the README, in docs/ and in launch/README.md parses through the real flag parsers of the
program it runs (bigr_jax.main, bigr_jax.convert, bigr_jax.app, launch/tpu.py, benchmarks/*.py): an unknown flag,
config file or config key fails the test. Nothing is run."""

import importlib.util
import pathlib
import re
import shlex

import pytest
from absl import flags

from bigr_jax import app, families, main, typed_config
from bigr_jax import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = re.compile(r"-m bigr_jax\.(main|convert|app)\b|(benchmarks/\w+\.py|launch/tpu\.py)")


def _snippets(text: str):
  """Fenced code lines (a trailing backslash continues a line), and inline code spans that pass flags (a span
  that only names a program is a reference, not a command)."""
  fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
  for block in fenced:
    yield from block.replace("\\\n", " ").splitlines()
  inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
  yield from (span for span in inline if " --" in span)


def commands():
  """(where, program, argv) of every command in the docs."""
  found = []
  for doc in DOCS:
    for snippet in _snippets(doc.read_text()):
      if not PROGRAMS.search(snippet):
        continue
      words = shlex.split(snippet, comments=True)
      segments, current = [], []
      for word in words + ["&&"]:
        if word in ("&&", "||", ";", "|"):
          segments.append(current)
          current = []
        else:
          current.append(word)
      for segment in segments:
        for i, word in enumerate(segment):
          module = segment[i + 1] if word == "-m" and i + 1 < len(segment) else ""
          if module.startswith("bigr_jax.") or re.fullmatch(r"(\S*/)?(benchmarks/\w+\.py|launch/tpu\.py)", word):
            program = module or word[word.index("benchmarks/") if "benchmarks/" in word else word.index("launch/"):]
            found.append((f"{doc.relative_to(ROOT)}: {snippet.strip()[:100]}", program,
                          segment[i + (2 if module else 1):]))
            break
  return found


def _absl(define, argv):
  values = flags.FlagValues()
  define(values, sys_argv=["prog", *argv])
  rest = values(["prog", *argv])
  assert rest == ["prog"], f"unexpected arguments {rest[1:]}"  # the programs refuse them
  return values


def parse(program: str, argv: list) -> None:
  """Raises if `argv` is not a valid command line of `program` (flags, config file, config keys, mode)."""
  if program == "bigr_jax.main":
    values = _absl(main.define_flags, argv)
    families.entry_point(values.config, values.mode or values.config.mode, values.overwrite)
    families.check_models(values.config)
  elif program == "bigr_jax.app":
    _absl(app.define_flags, argv)
  elif program == "bigr_jax.convert":
    args = convert.parse_args(argv)
    typed_config.load_config_file(args.config, args.overrides)
  else:
    spec = importlib.util.spec_from_file_location(pathlib.Path(program).stem, ROOT / program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if program == "launch/tpu.py":
      args, unknown = module.parser().parse_known_args([a for a in argv if a != "--"])
      overrides = [a for a in unknown if a.startswith("--config.")]
      assert overrides == unknown, f"unknown arguments {unknown}"
      if args.command == "run":
        typed_config.load_config_file(str(ROOT / args.config), overrides)
      return
    args = module.build_parser().parse_args(argv)
    names = [name for name in getattr(args, "configs", "").split(",") if name]
    if program == "benchmarks/tpu_plan.py":  # config files in configs/, with --config.* overrides for each
      for name in names:
        typed_config.load_config_file(f"configs/{name}", [s for s in args.set.split(",") if s])
      assert set(args.slices.split(",")) <= set(module.SLICES), args.slices
    else:
      assert set(names) <= set(getattr(module, "CONFIGS", names)), names
    if getattr(args, "config", None):
      typed_config.load_config_file(args.config)


def test_the_docs_hold_commands():
  programs = {program for _, program, _ in commands()}
  assert {"bigr_jax.main", "bigr_jax.convert", "bigr_jax.app"} <= programs, programs


@pytest.mark.parametrize("where,program,argv", commands(), ids=lambda value: str(value)[:60])
def test_every_command_in_the_docs_parses(where, program, argv, monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths are relative to the checkout, as the docs say
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # a script's folder is on its path
  try:
    parse(program, argv)
  except SystemExit as e:  # argparse's way of refusing
    pytest.fail(f"{where}: refused ({e})")
  except Exception as e:  # noqa: BLE001 (any refusal fails, with the command named)
    pytest.fail(f"{where}: {type(e).__name__}: {e}")


def test_a_misspelled_flag_or_config_key_is_caught(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  for program, argv in (("bigr_jax.main", ["--config=configs/bigr_l.py", "--workdir=w", "--config.optim.lrr=1"]),
                        ("bigr_jax.main", ["--config=configs/bigr_l.py", "--workdirr=w"]),
                        ("bigr_jax.convert", ["from-torch", "--config=configs/bigr_l.py", "--input=a", "--output=b",
                                              "--config.model.dimm=3"]),
                        ("benchmarks/tpu_plan.py", ["--configs=bigr_l.py", "--set=--config.mesh.fsdpp=2"])):
    with pytest.raises((Exception, SystemExit)):
      parse(program, argv)
