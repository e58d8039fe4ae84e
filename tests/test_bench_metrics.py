"""The task metrics of benchmarks/bench_onnx_in.py, on outputs made by hand."""

import numpy as np

from benchmarks.bench_onnx_in import box_agreement


def yolo_output(boxes: list[tuple[float, float, float, float, int, float]], classes: int = 3) -> np.ndarray:
    """A YOLOv8 output (4 + classes, anchors) from (cx, cy, w, h, class, score) per anchor."""
    out = np.zeros((4 + classes, len(boxes)), np.float32)
    for i, (cx, cy, w, h, c, score) in enumerate(boxes):
        out[:4, i] = cx, cy, w, h
        out[4 + c, i] = score
    return out


def test_box_f1_matches_boxes_of_one_class_one_to_one():
    """Two boxes of the same class, found again in the other order: F1 1 (this case used to stop
    the benchmark: matching compared the boxes' arrays); one of them lost: F1 2/3; moved far: 0."""
    float_out = yolo_output([(10, 10, 8, 8, 1, 0.9), (50, 50, 8, 8, 1, 0.8)])
    swapped = yolo_output([(50, 50, 8, 8, 1, 0.95), (10, 10, 8, 8, 1, 0.7)])
    assert box_agreement([float_out], [swapped]) == (1.0, 2)
    one_lost = yolo_output([(10, 10, 8, 8, 1, 0.9), (50, 50, 8, 8, 1, 0.1)])
    assert box_agreement([float_out], [one_lost])[0] == 2 * 1 / 3
    moved = yolo_output([(30, 30, 8, 8, 1, 0.9), (70, 70, 8, 8, 1, 0.8)])
    assert box_agreement([float_out], [moved])[0] == 0.0
