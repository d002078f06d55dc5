"""notebooks/quickstart.ipynb, executed headless (nbclient) with a tiny model and 4 steps."""

import os

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
pytest.importorskip('ipykernel')

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'notebooks', 'quickstart.ipynb')
SMALL = "WORKDIR = 'runs/quickstart'\nPRESET = 'model=tiny,steps=4'\nBATCH_SIZE = 8\nNUM_SHOWN = 3\n"


def _text(cell) -> str:
  return ''.join(output.get('text', '') + str(output.get('data', {}).get('text/plain', ''))
                 for output in cell.get('outputs', []))


def test_quickstart_runs_end_to_end(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [cell for cell in notebook.cells if 'parameters' in cell.metadata.get('tags', [])]
  assert len(parameters) == 1
  parameters[0].source = SMALL
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on a failure
  outputs = '\n'.join(_text(cell) for cell in notebook.cells if cell.cell_type == 'code')
  assert 'held-out exact match: ' in outputs
  assert 'transformers: ' in outputs
  assert any(output.get('data', {}).get('image/png') for cell in notebook.cells
             for output in cell.get('outputs', []))  # the answers on their images
  assert (tmp_path / 'runs' / 'quickstart' / 'hf' / 'model.safetensors').exists()
  assert "'example_id'" in _text(notebook.cells[-1])  # rows read back from SQLite
