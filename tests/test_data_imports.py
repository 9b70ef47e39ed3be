"""The data modules' import graph: `paths` and `schema` are leaves, the generators do not
import the parser, no module of levi_jax.data is on an import cycle, and each imports alone."""

import ast
import os
import subprocess
import sys

import pytest

import levi_jax

PACKAGE_DIR = os.path.dirname(levi_jax.__file__)


def _modules() -> dict[str, str]:
  """Every module of levi_jax -> its source file."""
  out = {}
  for root, _, files in os.walk(PACKAGE_DIR):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE_DIR))[:-3]
        name = rel.replace(os.sep, ".").removesuffix(".__init__")
        out[name] = os.path.join(root, f)
  return out


MODULES = _modules()
DATA_MODULES = sorted(m for m in MODULES if m.startswith("levi_jax.data."))


def _imports(name: str) -> set[str]:
  """The levi_jax modules `name` imports anywhere in its source (function-level imports too)."""
  tree = ast.parse(open(MODULES[name]).read())
  package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for a in node.names:
        out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
  return {m for m in out if m in MODULES and m != name}


GRAPH = {m: _imports(m) for m in MODULES}


def _path_back(start: str) -> list[str] | None:
  """A chain of imports from `start` back to itself, if there is one."""
  parent, todo = {}, [start]
  while todo:
    m = todo.pop()
    for n in GRAPH[m]:
      if n == start:
        chain = [m]
        while chain[-1] != start:
          chain.append(parent[chain[-1]])
        return [start, *reversed(chain[:-1]), start] if m != start else [start, start]
      if n not in parent:
        parent[n] = m
        todo.append(n)
  return None


def test_paths_and_schema_import_nothing_from_levi_jax():
  assert GRAPH["levi_jax.data.paths"] == set()
  assert GRAPH["levi_jax.data.schema"] == set()


def test_generators_do_not_import_the_parser():
  for generator in ("levi_jax.data.synthetic", "levi_jax.data.synthetic_scale"):
    assert "levi_jax.data.formats" not in GRAPH[generator], generator
    assert "levi_jax.data.schema" in GRAPH[generator], generator


@pytest.mark.parametrize("name", DATA_MODULES + ["levi_jax.input_pipeline"])
def test_no_import_cycle_through_data_modules(name):
  chain = _path_back(name)
  assert chain is None, " -> ".join(chain)


@pytest.mark.parametrize("name", DATA_MODULES)
def test_each_data_module_imports_in_a_fresh_interpreter(name):
  res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-2000:]
