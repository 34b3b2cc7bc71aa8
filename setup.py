"""pip/venv installation of dense_match_ros (the colcon build goes through CMakeLists.txt).

The generated message bindings are not built here: scripts/setup_venv.sh builds msg/ with
rosidl into the venv first, then installs this package beside them.
"""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'dense_match_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    description='Learned dense visual correspondence for ROS 2',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=[PACKAGE, f'{PACKAGE}.*']),
    package_data={PACKAGE: ['weights/*.pt', 'weights/*.json']},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*')),
        (f'share/{PACKAGE}/config', glob('config/*')),
    ],
    install_requires=['numpy', 'opencv-contrib-python-headless', 'scipy', 'pyyaml', 'tqdm'],
    entry_points={
        'console_scripts': [
            'dense-match-eval = dense_match_ros.evaluation.cli:main',
            'dense-match-make-pairs = dense_match_ros.data.make_pairs:main',
            'dense-match-train = dense_match_ros.training.cli:main',
            'dense-match-bench-pose = dense_match_ros.evaluation.bench_pose:main',
            'dense-match-bench = dense_match_ros.evaluation.bench_match:main',
            'dense-match-calibrate = dense_match_ros.evaluation.calibrate:main',
            'dense-match-node = dense_match_ros.ros.node:main',
            'dense-match-replay = dense_match_ros.ros.tools.replay:main',
            'dense-match-make-bag = dense_match_ros.ros.tools.make_bag:main',
            'dense-match-demo = dense_match_ros.ros.tools.demo:main',
            'dense-match-soak = dense_match_ros.ros.tools.soak:main',
        ],
    },
)
