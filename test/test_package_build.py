"""The colcon/ament build path: CMakeLists.txt installs one package holding both the
generated messages and our Python sources, laid out as launch_ros and `ros2 run` expect.

Runs the same cmake configure/build/install that colcon's ament_cmake task runs, into a
temporary prefix, with the rosidl toolchain of the venv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cmake() -> str:
    exe = Path(sys.prefix) / 'bin' / 'cmake'
    if exe.exists():
        return str(exe)
    found = shutil.which('cmake')
    if not found:
        pytest.skip('cmake not available')
    return found


@pytest.fixture(scope='module')
def install_prefix(tmp_path_factory) -> Path:
    if not (Path(sys.prefix) / 'share' / 'rosidl_default_generators').is_dir():
        pytest.skip('rosidl generators not installed in this Python prefix')
    # A workspace copy, as colcon sees it (ws/src/<pkg>); building in place would put the
    # venv (inside the repository) under the source dir, which CMake refuses for exports.
    src = tmp_path_factory.mktemp('ws') / 'dense_match_ros'
    src.mkdir()
    for name in ('CMakeLists.txt', 'package.xml', 'msg', 'dense_match_ros', 'scripts',
                 'launch', 'config', 'resource'):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(path, src / name)
    build = tmp_path_factory.mktemp('build')
    prefix = tmp_path_factory.mktemp('install')
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix, CMAKE_PREFIX_PATH=sys.prefix,
               PATH=f'{Path(sys.prefix) / "bin"}:{os.environ.get("PATH", "")}')
    cmake = _cmake()
    for cmd in ([cmake, '-S', str(src), '-B', str(build), f'-DCMAKE_INSTALL_PREFIX={prefix}',
                 '-DBUILD_TESTING=OFF', f'-DPython3_EXECUTABLE={sys.executable}'],
                [cmake, '--build', str(build), '-j2'],
                [cmake, '--install', str(build)]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f'{cmd[1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return prefix


def test_install_layout_has_messages_sources_and_executables(install_prefix):
    site = install_prefix / 'lib' / f'python{sys.version_info.major}.{sys.version_info.minor}' / 'site-packages'
    pkg = site / 'dense_match_ros'
    assert (pkg / 'msg' / '_relative_pose.py').is_file()
    assert (pkg / 'core' / 'registry.py').is_file()
    # Our __init__ (with the path extension), not rosidl's empty one.
    assert 'extend_path' in (pkg / '__init__.py').read_text()
    for exe in ('dense_match_node', 'dense_match_replay', 'dense_match_make_bag', 'dense_match_eval',
                'dense_match_demo', 'dense_match_soak'):
        path = install_prefix / 'lib' / 'dense_match_ros' / exe
        assert path.is_file() and os.access(path, os.X_OK), exe
    share = install_prefix / 'share' / 'dense_match_ros'
    assert (share / 'package.xml').is_file()
    assert (install_prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'dense_match_ros').is_file()
    for sub in ('launch', 'config'):
        src = sorted(p.name for p in (REPO / sub).iterdir() if p.is_file())
        assert sorted(p.name for p in (share / sub).iterdir()) == src


def test_installed_package_imports_messages_and_core(install_prefix, tmp_path):
    site = next((install_prefix / 'lib').glob('python3*/site-packages'))
    code = ('import dense_match_ros, dense_match_ros.msg as m\n'
            'from dense_match_ros.core import load_matcher\n'
            'assert dense_match_ros.__path__[0].startswith(%r), dense_match_ros.__path__\n'
            'p = m.RelativePose(); p.valid = True; assert p.STATUS_OK == "ok"\n'
            'print(type(load_matcher("dis", device="cpu")).__name__)\n') % str(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == 'DisMatcher'


def test_package_xml_is_format_3_and_declares_runtime_dependencies():
    root = ET.parse(REPO / 'package.xml').getroot()
    assert root.get('format') == '3'
    assert root.findtext('name') == 'dense_match_ros'
    assert root.find('export/build_type').text == 'ament_cmake'
    deps = {e.text for e in root if e.tag in ('depend', 'exec_depend')}
    for key in ('rclpy', 'sensor_msgs', 'geometry_msgs', 'std_msgs', 'diagnostic_msgs',
                'builtin_interfaces', 'rosidl_default_runtime', 'python3-numpy', 'python3-opencv'):
        assert key in deps, key
    assert root.find('member_of_group').text == 'rosidl_interface_packages'
