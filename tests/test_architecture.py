"""The layout of docs/architecture.md, held against the code: the layers' import rule, configs that import only
configuration, and a mode added to a family in that family alone."""

import ast
import json
import os
import subprocess
import sys

import pytest

from bigr_jax import families, main, typed_config
from bigr_jax.families.base import Mode
from conftest import ROOT

# docs/architecture.md's table, from the bottom up: a module may import its own layer and the ones below.
LAYERS = [
    ("configuration", ["typed_config", "config_sections", "config_lib", "models.config"]),
    ("foundations", ["files", "console", "platforms", "workdir_lock", "trees", ""]),
    ("models", ["models"]),
    ("devices", ["parallel", "chips"]),
    ("data and weight files", ["data", "weights", "images"]),
    ("loading", ["hub", "artifacts"]),
    ("work", ["train", "sampling", "evaluation", "compile"]),
    ("families", ["families"]),
    ("commands", ["main", "supervisor", "app", "convert"]),
]
WORK = ("train", "sampling", "evaluation", "compile")


def _module_name(path) -> str:
  parts = path.relative_to(ROOT / "bigr_jax").with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
  path = ROOT.joinpath(*dotted.split("."))
  return path.with_suffix(".py").is_file() or path.is_dir()


def _imported(node) -> list:
  """The bigr_jax modules an import statement names, relative to the package ('' is the package itself)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module:  # `from a.b import c`: module a.b.c if it is one, else a.b
    names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module for a in node.names]
  else:
    return []
  return [n.partition(".")[2] for n in names if n.partition(".")[0] == "bigr_jax"]


def import_graph() -> dict:
  """{module: the bigr_jax modules it imports}, read from the source."""
  graph = {}
  for path in sorted((ROOT / "bigr_jax").rglob("*.py")):
    tree = ast.parse(path.read_text(), str(path))
    graph[_module_name(path)] = {m for node in ast.walk(tree) for m in _imported(node)}
  return graph


def layer_of(module: str) -> int:
  """The index in LAYERS of the longest prefix naming the module; -1 for a module no layer names."""
  matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
  return max(matches)[1] if matches else -1


def violations(graph: dict) -> list:
  out = []
  for module, imported in sorted(graph.items()):
    for target in sorted(imported):
      if layer_of(target) > layer_of(module):
        out.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
      if module.split(".")[0] == "compile" and target.split(".")[0] in WORK and target.split(".")[0] != "compile":
        out.append(f"{module} imports {target}: compile/ builds no program")
  return out


def test_no_module_imports_a_layer_above_its_own():
  graph = import_graph()
  assert {"families.generator", "compile.report", "weights.io", "convert", "config_sections"} <= set(graph)
  assert violations(graph) == []
  # The rule catches what it forbids: a sampler reaching for a family, a weight file for the loader.
  broken = {**graph, "sampling.sampler": graph["sampling.sampler"] | {"families"},
            "weights.io": graph["weights.io"] | {"artifacts"}}
  assert violations(broken) == ["sampling.sampler (work) imports families (families)",
                                "weights.io (data and weight files) imports artifacts (loading)"]


def test_the_layers_name_every_module_in_the_package():
  unlisted = [m for m in import_graph() if layer_of(m) < 0]
  assert unlisted == [], f"modules of no layer in docs/architecture.md: {unlisted}"
  documented = (ROOT / "docs" / "architecture.md").read_text()
  for name, prefixes in LAYERS:
    row = next(line for line in documented.splitlines() if line.startswith(f"| {name} |"))
    for prefix in filter(None, prefixes):
      shown = prefix.replace(".", "/")
      assert f"`{shown}.py`" in row or f"`{shown}/`" in row, (name, prefix, row)


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("bigr_jax.train", "bigr_jax.sampling", "bigr_jax.evaluation", "bigr_jax.data")
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
      raise ImportError(f"loading a config file imported {name}")
sys.meta_path.insert(0, Block())
import json
from bigr_jax import typed_config
for spec in sys.argv[1:]:
  typed_config.load_config_file(spec)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("bigr_jax"))))
"""


def test_loading_every_config_file_imports_only_configuration():
  specs = sorted(str(p) for p in (ROOT / "configs").glob("*.py")) + ["configs/demo.py:quick", "configs/bigr_l.py:runlocal",
                                                                     "configs/bae_d24.py:runlocal"]
  result = subprocess.run([sys.executable, "-c", BLOCKER, *specs], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
  assert loaded <= {"bigr_jax", "bigr_jax.platforms", "bigr_jax.typed_config", "bigr_jax.config_sections",
                    "bigr_jax.config_lib", "bigr_jax.models", "bigr_jax.models.config"}, loaded


def _keys(section, prefix="") -> set:
  return {key for name, value in section.items()
          for key in (_keys(value, f"{prefix}{name}.") if hasattr(value, "items") else {f"{prefix}{name}"})}


def test_every_config_file_starts_from_its_family_base_config():
  """What a family declares as its base config is what its config files build on: they hold every field of it."""
  bases = {"generator": families.family("generator").base_config(),
           "tokenizer": families.family("tokenizer").base_config(bits=24, image_size=256, total_steps=0)}
  for path in sorted((ROOT / "configs").glob("*.py")):
    config = typed_config.load_config_file(str(path))
    stages = [config.tokenizer, config.generator] if config.family == "demo" else [config]
    for stage in stages:
      missing = _keys(bases[stage.family]) - _keys(stage)
      assert not missing, (path.name, stage.family, sorted(missing)[:5])


def test_a_mode_added_to_a_family_is_dispatched_by_main_with_nothing_else_changed(tmp_path, monkeypatch):
  """The family's `modes` is the one place: main's dispatch, its mode list and its errors follow it."""
  calls = []
  generator = families.family("generator")
  monkeypatch.setitem(generator.modes, "hello", Mode("say hello", lambda config, workdir: calls.append(workdir)))
  config = typed_config.load_config_file(str(ROOT / "configs" / "bigr_l.py:runlocal"))
  assert "hello" in families.mode_names()
  main.run_entry(families.entry_point(config, "hello"), config, str(tmp_path))
  assert calls == [str(tmp_path)]
  tokenizer_config = typed_config.load_config_file(str(ROOT / "configs" / "bae_d24.py:runlocal"))
  with pytest.raises(ValueError, match="^--mode=hello needs a config of family generator; this config is a tokenizer"):
    families.entry_point(tokenizer_config, "hello")
