"""The code is formatted by pyink with the repository's pyproject.toml."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyink_finds_nothing_to_reformat():
  if importlib.util.find_spec('pyink') is None:
    pytest.skip('pyink is not installed (pip install -e ".[test]")')
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'pyink',
          '--check',
          '--diff',
          'ctsft_jax',
          'experiments',
          'tests',
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
