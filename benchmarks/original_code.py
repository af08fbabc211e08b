"""Imports the original PyTorch BiGR (`llama.gpt`) from a checkout of it, for side-by-side benchmarks.

Nothing of it is copied into the project: the files are written to a temp directory at run time.
"""

import os
import subprocess
import sys
import tempfile
import types

ORIGINAL_FILES = ("llama/gpt.py", "llama/bindiff/binarylatent.py", "llama/drop_path.py")


def load_original(repo: str):
  """`llama.gpt` from a temp copy of the checkout at `repo`, with torchvision stubbed (it only imports it)."""
  root = tempfile.mkdtemp(prefix="bigr_original_")
  for path in ORIGINAL_FILES:
    text = subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout
    os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
    with open(os.path.join(root, path), "w") as f:
      f.write(text)
  for package in ("llama", "llama/bindiff"):
    open(os.path.join(root, package, "__init__.py"), "a").close()
  sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
  sys.path.insert(0, root)
  from llama import gpt  # pylint: disable=import-outside-toplevel
  return gpt
