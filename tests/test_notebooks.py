"""Tests for the notebooks: committed clean, and running top to bottom.

The study notebook runs on CPU with a tiny setting injected after its
`parameters` cell (as papermill does); the explore notebook then redraws the
figures from the workdir the first one wrote. Any cell error fails the test.
"""

import json
import os

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), os.pardir, 'notebooks')
STUDY = os.path.join(NOTEBOOK_DIR, 'k_budget_tradeoff.ipynb')
EXPLORE = os.path.join(NOTEBOOK_DIR, 'explore_results.ipynb')
CELL_TIMEOUT_S = 240
# A 16-wide, 1-layer model on the synthetic task, K in {1, 2}: two compiles.
TINY = {
    'data.source': 'synthetic',
    'base.kind': 'random',
    'model.d_model': 16,
    'model.n_heads': 2,
    'model.d_mlp': 32,
    'model.max_len': 16,
    'data.seq_len': 16,
    'data.max_prompt_tokens': 8,
    'data.synthetic_examples': 200,
    'data.max_eval_examples': 32,
    'data.batch_size': 4,
    'train.eval_batch': 16,
    'studies.budget_matched.ranks': (1, 2),
    'studies.budget_multipliers.enabled': False,
    'studies.crossover.enabled': False,
    'studies.wallclock_matched.enabled': False,
    'budget.anchor_rank': 2,
    'budget.anchor_steps': 6,
}


def read(path) -> nbformat.NotebookNode:
  return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def with_parameters(notebook, **values) -> nbformat.NotebookNode:
  """A copy with a cell assigning `values` right after the parameters cell."""
  notebook = nbformat.from_dict(json.loads(json.dumps(notebook)))
  (index,) = [
      i
      for i, cell in enumerate(notebook.cells)
      if 'parameters' in cell.metadata.get('tags', [])
  ]
  source = '\n'.join(f'{name} = {value!r}' for name, value in values.items())
  injected = nbformat.v4.new_code_cell(source)
  injected.metadata['tags'] = ['injected-parameters']
  notebook.cells.insert(index + 1, injected)
  return notebook


def execute(notebook, cwd) -> nbformat.NotebookNode:
  """Runs every cell in a fresh kernel; a cell error raises."""
  client = nbclient.NotebookClient(
      notebook,
      timeout=CELL_TIMEOUT_S,
      kernel_name='python3',
      resources={'metadata': {'path': str(cwd)}},
  )
  client.execute()
  return notebook


def outputs_of(notebook, mime: str) -> list:
  return [
      output['data'][mime]
      for cell in notebook.cells
      if cell.cell_type == 'code'
      for output in cell.outputs
      if mime in output.get('data', {})
  ]


@pytest.mark.parametrize('path', [STUDY, EXPLORE])
def test_committed_notebooks_carry_no_outputs(path):
  notebook = read(path)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source
  tags = [cell.metadata.get('tags', []) for cell in code]
  assert sum('parameters' in t for t in tags) == 1


@pytest.fixture(scope='module')
def study_run(tmp_path_factory):
  """The study notebook executed on the tiny setting, and its workdir."""
  root = tmp_path_factory.mktemp('study')
  workdir = str(root / 'workdir')
  overrides = dict(TINY, **{'train.cache_dir': str(root / 'cache')})
  notebook = with_parameters(
      read(STUDY),
      CONFIG_VARIANT='smoke',
      SEEDS=2,
      WORKDIR=workdir,
      OVERWRITE=True,
      OVERRIDES=overrides,
  )
  return execute(notebook, root), workdir


def test_study_notebook_runs_and_shows_report_and_figures(study_run):
  notebook, workdir = study_run
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['seeds'] == [0, 1]
  assert {c['K'] for c in results['cells']} == {1, 2}
  markdown = '\n'.join(
      ''.join(m) for m in outputs_of(notebook, 'text/markdown')
  )
  assert '## Setup' in markdown and '| K |' in markdown
  assert '![' not in markdown  # Image links are shown as images instead.
  pngs = [p for p in os.listdir(workdir) if p.endswith('.png')]
  assert pngs
  assert len(outputs_of(notebook, 'image/png')) == len(pngs)
  if results.get('analysis', {}).get('verdicts'):
    assert "Verdicts on the paper's claims" in markdown


def test_explore_notebook_redraws_from_the_study_workdir(study_run, tmp_path):
  _, workdir = study_run
  output_dir = str(tmp_path / 'redrawn')
  notebook = with_parameters(
      read(EXPLORE), WORKDIR=workdir, OUTPUT_DIR=output_dir
  )
  execute(notebook, tmp_path)
  redrawn = os.listdir(output_dir)
  assert redrawn and all(name.endswith('.png') for name in redrawn)
  assert len(outputs_of(notebook, 'image/png')) == len(redrawn)
  text = '\n'.join(''.join(m) for m in outputs_of(notebook, 'text/markdown'))
  assert '## Setup' in text and '| K |' in text
