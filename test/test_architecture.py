"""The layering the README's Architecture section promises, checked on the source tree."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'dense_match_ros'


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_nothing_above_it():
    above = ('dense_match_ros.data', 'dense_match_ros.training', 'dense_match_ros.evaluation',
             'dense_match_ros.ros', 'rclpy')
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p)
                                                     if m.startswith(above))
                 for p in (PACKAGE / 'core').rglob('*.py')}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob('*.py')
            if (n := len(p.read_text(encoding='utf-8').splitlines())) > 500}
    assert long == {}


def test_the_node_path_loads_no_evaluation_or_training():
    code = ('import sys, dense_match_ros.ros.node, dense_match_ros.core.methods.neuflow; '
            'print([m for m in sys.modules if m.startswith(("dense_match_ros.evaluation", '
            '"dense_match_ros.training"))])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout.strip()
    assert out == '[]'
