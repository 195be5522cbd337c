"""tools/mutation_check.py stays true to the code: every mutation's search text occurs exactly once in its file,
and every test it expects to catch the mutation exists. (The mutation run itself takes minutes; run it by hand.)"""

from __future__ import annotations

import importlib.util
import re
import sys

from tests.conftest import REPO


def _mutations():
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "tools" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTATIONS


def test_every_mutation_still_applies_and_names_real_tests():
    from tests.validate.test_mil_ops import CASES

    case_ids = {case.id for case in CASES}
    mutations = _mutations()
    names = [m.name for m in mutations]
    assert len(names) == len(set(names)) and len(mutations) >= 17
    for mutation in mutations:
        text = (REPO / mutation.file).read_text()
        assert text.count(mutation.search) == 1, f"{mutation.name}: the search text occurs {text.count(mutation.search)} times in {mutation.file}; update the mutation"
        assert mutation.replace != mutation.search and mutation.tests, mutation.name
        for node in mutation.tests:
            path, _, test = node.partition("::")
            function, _, param = test.partition("[")
            source = (REPO / path).read_text()
            assert re.search(rf"^def {re.escape(function)}\(", source, re.M), f"{mutation.name}: no test {node}"
            if param:  # a parametrized case: each part of its id is a case of that test
                parts = param.rstrip("]").split("-")
                known = case_ids if path == "tests/validate/test_mil_ops.py" else None
                for part in parts:
                    assert (part in known) if known is not None else (part in source), f"{mutation.name}: no case {param!r} in {path}"
