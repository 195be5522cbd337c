"""The README's target table is the profiles' own (tools/readme_targets.py writes it): a scheme added to or
dropped from a profile without the README following fails here."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def table() -> str:
    spec = importlib.util.spec_from_file_location("readme_targets", REPO / "tools" / "readme_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table()


def test_the_readme_target_table_is_generated_from_the_profiles():
    expected = table()
    assert expected in README.read_text(), (
        "README.md's target table differs from the profiles; regenerate it with `python tools/readme_targets.py`:\n" + expected
    )
