#!/usr/bin/env bash
# How many of 8 best-effort 640x480 rgb8 frames reach another process, per Fast DDS set-up:
# the default transports, and FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA with the default and the
# LOCALHOST discovery range (README, "Camera streams and DDS"). Usage: check_best_effort_delivery.sh [REPEATS]
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$HERE/../.venv/bin/python}"
ROLE_SCRIPT="$(mktemp -d)/be.py"
cat > "$ROLE_SCRIPT" <<'PYEOF'
import sys, time
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
rclpy.init()
if sys.argv[1] == 'sub':
    node = rclpy.create_node('be_sub')
    n = [0]
    node.create_subscription(Image, '/be/image', lambda m: n.__setitem__(0, n[0] + 1),
                             qos_profile_sensor_data)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 25:
        rclpy.spin_once(node, timeout_sec=0.1)
    print(n[0])
else:
    from dense_match_ros.ros.tools.soak_inputs import camera_frames, image_msg
    node = rclpy.create_node('be_pub')
    pub = node.create_publisher(Image, '/be/image', qos_profile_sensor_data)
    msg = image_msg(camera_frames(2, (640, 480))[0], 1)
    t0 = time.monotonic()
    while pub.get_subscription_count() == 0 and time.monotonic() - t0 < 15:
        time.sleep(0.1)
    time.sleep(1.0)
    for _ in range(8):
        pub.publish(msg)
        time.sleep(0.5)
PYEOF
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
for rep in $(seq "${1:-1}"); do
  for setup in "default transports|" "LARGE_DATA|LARGE_DATA" "LARGE_DATA + LOCALHOST range|LARGE_DATA LOCALHOST"; do
    name="${setup%%|*}"; read -r transport range <<< "${setup#*|}"
    out="$(env -u FASTDDS_BUILTIN_TRANSPORTS -u ROS_AUTOMATIC_DISCOVERY_RANGE ROS_DOMAIN_ID=$((RANDOM % 90 + 5)) \
      ${transport:+FASTDDS_BUILTIN_TRANSPORTS=$transport} ${range:+ROS_AUTOMATIC_DISCOVERY_RANGE=$range} \
      bash -c "'$PY' '$ROLE_SCRIPT' sub & sleep 1; '$PY' '$ROLE_SCRIPT' pub >/dev/null; wait")"
    echo "$name: $out of 8 frames"
  done
done
