"""rosbag2 round trips (sqlite3 and mcap) of camera inputs and the node's outputs."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('rclpy')

from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage  # noqa: E402

from dense_match_ros.ros import convert  # noqa: E402
from dense_match_ros.ros.tools import bag_io  # noqa: E402

dm = pytest.importorskip('dense_match_ros.msg')

STORAGES = ['sqlite3', 'mcap']


def _messages():
    """(topic, msg, bag timestamp) covering every type the tools read or write."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    image = convert.make_image_msg(rgb, 'rgb8', 10_000_000_123, 'cam')
    flow = rng.normal(size=(3, 5, 2)).astype(np.float32)
    flow_msg = convert.make_image_msg(flow, '32FC2', 10_033_000_000, 'cam')
    info = CameraInfo()
    info.header.frame_id = 'cam'
    info.width, info.height = 5, 3
    info.k = [4.0, 0.0, 2.0, 0.0, 4.5, 1.0, 0.0, 0.0, 1.0]
    info.d = [0.1, -0.01, 0.0, 0.0, 0.002]
    info.distortion_model = 'plumb_bob'
    comp = CompressedImage()
    comp.format = 'png'
    comp.data = b'\x89PNG fake'
    rel = dm.RelativePose()
    rel.header.frame_id = 'cam'
    rel.source_stamp.sec = 10
    rel.rotation.w = 1.0
    rel.translation.x = 1.0
    rel.covariance = [float(i) for i in range(36)]
    rel.num_inliers = 321
    rel.valid = True
    rel.status = 'ok'
    res = dm.MatchResult()
    res.flow = flow_msg
    res.method = 'dis'
    pose = PoseWithCovarianceStamped()
    pose.pose.pose.position.z = -2.5
    return [('/cam/camera_info', info, 10_000_000_000), ('/cam/image', image, 10_000_000_123),
            ('/cam/image/compressed', comp, 10_000_000_200), ('/out/flow', flow_msg, 10_050_000_000),
            ('/out/relative_pose', rel, 10_060_000_000), ('/out/match_result', res, 10_070_000_000),
            ('/out/pose', pose, 10_080_000_000)]


@pytest.mark.parametrize('storage', STORAGES)
def test_round_trip_rclpy_messages(tmp_path, storage):
    written = _messages()
    with bag_io.BagWriter(tmp_path / 'bag', storage=storage) as w:
        for topic, msg, ts in reversed(written):  # out of order: the reader sorts by time
            w.write(topic, msg, ts)
    suffix = '.mcap' if storage == 'mcap' else '.db3'
    assert any(p.suffix == suffix for p in (tmp_path / 'bag').iterdir())
    with bag_io.BagReader(tmp_path / 'bag') as r:
        assert r.message_count == len(written)
        assert r.topics['/cam/image'] == bag_io.TopicSummary(bag_io.IMAGE, 1)
        assert r.topics['/out/relative_pose'].msgtype == bag_io.RELATIVE_POSE
        assert r.topics_of_type('sensor_msgs/CameraInfo') == ['/cam/camera_info']
        got = list(r.messages())
    assert [m.timestamp for m in got] == sorted(ts for _, _, ts in written)
    by_topic = {m.topic: m for m in got}
    for topic, msg, ts in written:
        assert by_topic[topic].to_ros() == msg, topic
        assert by_topic[topic].timestamp == ts
    flow = convert.image_to_array(by_topic['/out/flow'].to_ros())
    np.testing.assert_array_equal(flow, convert.image_to_array(written[3][1]))


@pytest.mark.parametrize('storage', STORAGES)
def test_rosbags_objects_decode_and_reencode_identically(tmp_path, storage):
    written = _messages()
    with bag_io.BagWriter(tmp_path / 'a', storage=storage) as w:
        for topic, msg, ts in written:
            w.write(topic, msg, ts)
    with bag_io.BagReader(tmp_path / 'a') as r:
        first = list(r.messages())
    rel = next(m for m in first if m.topic == '/out/relative_pose').decode()
    assert rel.num_inliers == 321 and rel.status == 'ok' and rel.covariance[35] == 35.0
    img = next(m for m in first if m.topic == '/cam/image').decode()
    # convert reads rosbags objects too: the same pixels as from the rclpy message.
    np.testing.assert_array_equal(convert.image_to_rgb(img),
                                  convert.image_to_rgb(written[1][1]))
    # Writing decoded rosbags objects (not rclpy ones) stores the same messages (the bytes
    # may differ in CDR alignment padding, which carries no value).
    with bag_io.BagWriter(tmp_path / 'b', storage=storage) as w:
        for m in first:
            w.write(m.topic, m.decode(), m.timestamp)
    with bag_io.BagReader(tmp_path / 'b') as r:
        second = list(r.messages())
    assert [(m.topic, m.msgtype, m.timestamp) for m in second] == \
        [(m.topic, m.msgtype, m.timestamp) for m in first]
    assert [m.to_ros() for m in second] == [m.to_ros() for m in first]


def test_raw_bytes_need_a_type_and_topics_keep_theirs(tmp_path):
    image = _messages()[1][1]
    raw, msgtype = bag_io.serialize(image)
    assert msgtype == bag_io.IMAGE
    with bag_io.BagWriter(tmp_path / 'bag') as w:
        with pytest.raises(ValueError, match='msgtype'):
            w.write('/x', raw, 1)
        w.write('/x', raw, 1, msgtype='sensor_msgs/Image')
        with pytest.raises(ValueError, match='already holds'):
            w.write('/x', CameraInfo(), 2)
        assert w.counts == {'/x': 1}
    with bag_io.BagReader(tmp_path / 'bag') as r:
        assert next(r.messages()).to_ros() == image
        with pytest.raises(KeyError, match='/nope'):
            list(r.messages(['/nope']))


def test_existing_bag_is_kept_unless_overwrite(tmp_path):
    with bag_io.BagWriter(tmp_path / 'bag') as w:
        w.write('/a', CameraInfo(), 1)
    with pytest.raises(FileExistsError):
        bag_io.BagWriter(tmp_path / 'bag')
    with bag_io.BagWriter(tmp_path / 'bag', overwrite=True) as w:
        w.write('/b', CameraInfo(), 1)
    with bag_io.BagReader(tmp_path / 'bag') as r:
        assert set(r.topics) == {'/b'}
    with pytest.raises(ValueError, match='storage'):
        bag_io.BagWriter(tmp_path / 'other', storage='rosbag1')


def test_type_names():
    assert bag_io.msgtype_of(CameraInfo) == bag_io.CAMERA_INFO
    assert bag_io.msgtype_of(dm.MatchResult()) == bag_io.MATCH_RESULT
    assert bag_io.normalize_msgtype('geometry_msgs/PoseWithCovarianceStamped') == bag_io.POSE_COV
    assert bag_io.ros_class(bag_io.RELATIVE_POSE) is dm.RelativePose
    with pytest.raises(ValueError):
        bag_io.normalize_msgtype('Image')


def test_jazzy_type_store_writes_readable_bags(tmp_path):
    info = _messages()[0][1]
    with bag_io.BagWriter(tmp_path / 'bag', distro='jazzy') as w:
        w.write('/cam/camera_info', info, 5)
    with bag_io.BagReader(tmp_path / 'bag', distro='jazzy') as r:
        msg = next(r.messages())
    assert msg.to_ros() == info and msg.decode().k[0] == 4.0
    with pytest.raises(ValueError, match='distro'):
        bag_io.typestore('rolling')
