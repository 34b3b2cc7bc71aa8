"""The bad-input catalogue: what a user or a device can get wrong, and the package's answer.

Each row names the test that feeds that input and checks that answer. The README's "Bad
inputs" table is generated from this list (``python test/bad_inputs.py --write``), and
``test_bad_inputs.py`` fails when a named test does not exist or the README's table is not
the generated one, so the table cannot drift from what is tested.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

START, END = '<!-- bad-inputs:start -->', '<!-- bad-inputs:end -->'


@dataclasses.dataclass(frozen=True)
class BadInput:
    where: str
    input: str
    answer: str
    test: str
    """'file.py::test_name' of the test that feeds the input and checks the answer."""


CASES = [
    BadInput('node', 'image with an unknown encoding (`yuv422_yuy2`)',
             'frame dropped, one throttled `[unknown_encoding]` warning that lists the camera '
             'encodings; the stream goes on', 'test_node_robustness.py::test_unknown_encoding'),
    BadInput('node', '`step*height != len(data)`', 'dropped, `[bad_data_size]` with the numbers',
             'test_node_robustness.py::test_step_height_mismatch'),
    BadInput('node', 'image size changes mid-stream', 'sequence restarts, `[size_changed]`',
             'test_node_robustness.py::test_size_change_mid_stream'),
    BadInput('node', 'camera_info with K all zeros', 'flow published, pose `no_camera_info`, '
             '`[zero_camera_info]`', 'test_node_robustness.py::test_zero_camera_info'),
    BadInput('node', 'stamps go backwards (bag loop)', 'reference reset, `[stamp_backwards]`',
             'test_node_robustness.py::test_stamps_backwards_resets'),
    BadInput('node', 'header.stamp left at 0 by the driver', '`[duplicate_stamp]` naming the cause; '
             '`stamp_source:=receipt` stamps frames on arrival',
             'test_node_robustness.py::test_unset_stamps_are_explained_and_receipt_stamps_fix_them'),
    BadInput('node', '1x1 image', 'dropped, `[image_too_small]`',
             'test_node_robustness.py::test_tiny_image_refused'),
    BadInput('node', '8000x8000 image', 'dropped before its data is read, `[image_too_large]`',
             'test_node_robustness.py::test_huge_image_refused_unless_allowed'),
    BadInput('node', 'truncated jpeg; no camera_info at all', 'dropped `[decode_failed]`; flow '
             'without pose, `[no_camera_info]` once',
             'test_node_robustness.py::test_compressed_input_without_camera_info'),
    BadInput('node', '`dense-match-node --help` (or `-h`, `--ros-args --help`)',
             'usage and every parameter with default and range, exit 0',
             'test_node_robustness.py::test_help_prints_the_parameters_instead_of_starting_the_node'),
    BadInput('node', 'unknown `method` at run time', 'refused with the reason, old model keeps running',
             'test_node.py::test_runtime_method_change_rejected_keeps_old'),
    BadInput('node', '`process_width`/`process_height` 1-15', 'refused with the reason, old value kept',
             'test_pipeline.py::test_processing_sizes_below_what_methods_accept_are_refused_and_the_old_value_kept'),
    BadInput('camera_info', 'K negative, NaN, wrong length or last row not (0, 0, 1)',
             '`invalid_camera_info`', 'test_convert.py::test_camera_info_refused'),
    BadInput('matcher', '`weights=` a file that is not a checkpoint (text, empty, `/etc/passwd`, '
             'another pickle, keys missing)', '`CheckpointError` naming the file and the expected '
             'formats', 'test_training.py::test_a_file_that_is_not_a_checkpoint_gets_one_clear_error'),
    BadInput('matcher', '`dis` with `fb_sigma: 0`, `max_side: 8`, or an 8x8 image',
             "the method's own `ValueError` (no NaN, no OpenCV error)",
             'test_dis.py::test_dis_refuses_what_would_break_it_with_its_own_errors'),
    BadInput('matcher', "`load_matcher('foo')`, an unknown option",
             'plain message with the available methods / the options the method takes',
             'test_dis.py::test_unknown_methods_and_options_are_named_plainly'),
    BadInput('matcher', '`cnngeo`: a float image, a grey or RGBA image, a side under 16 px',
             '`ValueError` naming the rule (uint8, HxWx3, at least 16 px)',
             'test_cnngeo.py::test_bad_inputs_raise_value_errors_naming_the_rule'),
    BadInput('matcher', '`dmp` / `dmp-scratch`: the same three', '`ValueError` naming the rule',
             'test_dmp.py::test_bad_inputs_name_the_rule'),
    BadInput('matcher', '`dmp`: a non-finite test-time loss', 'the loop stops with a warning and '
             'returns the best finite iterate; no NaN',
             'test_dmp.py::test_a_non_finite_loss_stops_with_a_warning_and_returns_the_best_finite_iterate'),
    BadInput('matcher', '`deepmatching`: a float or grey image, a side smaller than the top-level '
             'patch', '`ValueError` naming the rule',
             'test_deepmatching.py::test_bad_inputs_raise_value_errors_naming_the_rule'),
    BadInput('matcher', '`deepmatching`: a frame whose finest volume exceeds `max_memory_mb`',
             'matched at a smaller working size, with a warning',
             'test_deepmatching.py::test_a_volume_over_the_memory_bound_is_downscaled_with_a_warning'),
    BadInput('replay', 'an Image message cut in half', 'skipped, counted, named (topic, time, '
             'reason) in the report; the rest replays',
             'test_replay.py::test_replay_skips_a_corrupt_message_names_it_and_replays_the_rest'),
    BadInput('replay', 'random bytes as a bag; an existing output', 'one error line, exit 2; '
             '`--overwrite` needed', 'test_replay.py::test_unreadable_bags_and_existing_outputs_end_in_one_line'),
    BadInput('replay', 'camera_info stored after its image', 'matched by stamp, every pair gets a pose',
             'test_replay.py::test_camera_info_stored_after_its_image_still_gives_every_pair_a_pose_attempt'),
    BadInput('eval', 'no data for the chosen sets', 'exit 1, names `--sets synthetic`',
             'test_eval_cli.py::test_nothing_evaluated_is_an_error_that_names_the_way_out'),
]


def render() -> str:
    rows = ['| where | input | answer | test |', '|---|---|---|---|']
    rows += [f'| {c.where} | {c.input} | {c.answer} | `{c.test.split("::")[1]}` |' for c in CASES]
    return '\n'.join([START, *rows, END])


def readme_block(text: str) -> str | None:
    if START not in text or END not in text:
        return None
    return text[text.index(START):text.index(END) + len(END)]


if __name__ == '__main__':
    readme = Path(__file__).resolve().parents[1] / 'README.md'
    text = readme.read_text()
    if '--write' in sys.argv:
        block = readme_block(text)
        if block is None:
            raise SystemExit(f'{readme}: add the markers {START} and {END} first')
        readme.write_text(text.replace(block, render()))
    else:
        print(render())
