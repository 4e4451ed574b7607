"""Frames from video files and cameras, and annotated video out, with OpenCV.

OpenCV is optional: ``pip install 'camserve[video]'``. Nothing else in the client needs it.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import numpy as np

from . import reasons
from .errors import invalid


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("reading and writing video needs OpenCV: "
                          "pip install 'camserve[video]' (or opencv-python-headless)") from None
    return cv2


def require_opencv() -> None:
    """Raise ImportError, saying how to install it, when OpenCV cannot be imported."""
    _cv2()


def open_video(source: Union[str, int]):
    """A cv2.VideoCapture for a file path or a camera index; raises CamserveError if it fails."""
    cv2 = _cv2()
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        kind = "camera" if isinstance(source, int) else "video file"
        raise invalid(f"cannot open {kind} {source!r}", reasons.INVALID_VIDEO)
    return capture


def video_properties(capture) -> Tuple[float, int]:
    """(frames per second, frame count) as the container says; 0 where unknown."""
    cv2 = _cv2()
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    return float(fps), max(count, 0)


def read_frames(source: Union[str, int], max_frames: Optional[int] = None
                ) -> Iterator[np.ndarray]:
    """Frames of a video file or camera as uint8 (H, W, 3) RGB arrays."""
    cv2 = _cv2()
    capture = source if hasattr(source, "read") else open_video(source)
    try:
        count = 0
        while max_frames is None or count < max_frames:
            ok, frame = capture.read()
            if not ok:
                return
            count += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


class VideoWriter:
    """Writes uint8 RGB frames to a video file (mp4v for .mp4, MJPG otherwise)."""

    def __init__(self, path: str, fps: float, size: Tuple[int, int]) -> None:
        cv2 = _cv2()
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if str(path).lower().endswith(".mp4")
                                          else "MJPG"))
        self._size = (int(size[1]), int(size[0]))  # OpenCV wants (width, height)
        self._writer = cv2.VideoWriter(str(path), fourcc, float(fps or 30.0), self._size)
        if not self._writer.isOpened():
            raise invalid(f"cannot write video {path!r}", reasons.INVALID_VIDEO)
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        cv2 = _cv2()
        frame = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        if (frame.shape[1], frame.shape[0]) != self._size:
            frame = cv2.resize(frame, self._size)
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        self._writer.release()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def annotate(rgb: np.ndarray, lines) -> np.ndarray:
    """The frame with text lines in white on a dark band across its top (a solid band, so no
    outline pixels are left around the letters)."""
    cv2 = _cv2()
    out = np.ascontiguousarray(rgb).copy()
    scale = max(0.4, out.shape[0] / 720)
    step = int(28 * scale)
    band = min(out.shape[0], step * len(lines) + int(10 * scale))
    out[:band] = (out[:band] * 0.35).astype(out.dtype)
    for i, text in enumerate(lines):
        cv2.putText(out, text, (8, (i + 1) * step), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return out


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    cv2 = _cv2()
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise invalid("cannot encode a frame as JPEG", reasons.INVALID_IMAGE)
    return data.tobytes()
