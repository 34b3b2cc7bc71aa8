"""The README's bad-input table is the generated one, and every row names a real test."""
import ast
from pathlib import Path

import bad_inputs

TEST_DIR = Path(__file__).resolve().parent


def test_every_row_names_an_existing_test():
    for case in bad_inputs.CASES:
        file, _, name = case.test.partition('::')
        tree = ast.parse((TEST_DIR / file).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, case.test


def test_readme_holds_the_generated_table():
    block = bad_inputs.readme_block((TEST_DIR.parent / 'README.md').read_text())
    assert block == bad_inputs.render(), 'run: python test/bad_inputs.py --write'
