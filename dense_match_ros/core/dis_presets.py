"""OpenCV's DIS optical flow presets by name, read by the ``dis`` method and by the DIS
refinement of learned flows (:mod:`.refine`), so neither imports the other."""
from __future__ import annotations

import cv2

PRESETS = {
    'ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    'fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
    'medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def check_preset(preset: str, what: str = 'preset') -> None:
    """Refuse an unknown preset name, naming the option it came from."""
    if preset not in PRESETS:
        raise ValueError(f'{what} must be one of {sorted(PRESETS)}, got {preset!r}')


def create_dis(preset: str = 'medium') -> cv2.DISOpticalFlow:
    """A DIS instance of the named preset."""
    check_preset(preset)
    return cv2.DISOpticalFlow_create(PRESETS[preset])
