"""The README's zoo matrix is tests/zoo/matrix.json's own (tools/readme_zoo.py renders it; the zoo tests hold
every run's outcomes to that file): a matrix edited by hand, or recorded without regenerating the README, fails."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_zoo_matrix_is_rendered_from_the_recorded_outcomes():
    spec = importlib.util.spec_from_file_location("readme_zoo", REPO / "tools" / "readme_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.table()
    assert expected in (REPO / "README.md").read_text(), (
        "README.md's zoo matrix differs from tests/zoo/matrix.json; regenerate it with `python tools/readme_zoo.py --write`:\n"
        + expected
    )
