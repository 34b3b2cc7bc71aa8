"""dense_match_ros: learned dense visual correspondence for ROS 2.

The ROS message bindings generated from msg/ (``dense_match_ros.msg``) are installed by
rosidl into ``<site-packages>/dense_match_ros/``. When this package is imported from a
source tree or an editable install, that directory is a different one, so the package path
is extended to every ``dense_match_ros`` directory on ``sys.path``: the generated
``msg`` subpackage and typesupport extensions are then importable from either location.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = '0.1.0'
