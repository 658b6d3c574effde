"""COCO box detection metrics (pycocotools COCOeval) as an `evaluate` metric module, loaded from its local path.

    from pix2seq_hf.evaluation import load_coco_detection_metric

    metric = load_coco_detection_metric()  # = evaluate.load(".../pix2seq_hf/metrics/coco_detection/coco_detection.py")
    metric.add_batch(predictions=[...], references=[...])
    metric.compute(categories={0: "cat", 1: "dog"})

The computation is `pix2seq_hf.evaluation.CocoDetectionEvaluator`; this module only gives it the `evaluate` interface.
"""

import datasets
import evaluate

from pix2seq_hf.evaluation import CocoDetectionEvaluator


_DESCRIPTION = """
COCO box detection metrics (map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100), computed
by pycocotools COCOeval over every prediction (no score threshold). Crowd objects are ignored regions, as in COCO.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[dict]`): one per image, `{"image_id", "boxes" ([n, 4] xyxy pixels), "labels" ([n]),
        "scores" ([n])}`; an image without detections has empty lists.
    references (`list[dict]`): one per image, `{"image_id", "height", "width", "boxes" ([m, 4] xyxy pixels),
        "labels" ([m])}`, optionally `"iscrowd"` ([m], 0/1) and `"area"` ([m], COCO's object areas for the size
        ranges; box areas otherwise). Predictions are matched to references by `image_id`, in any order.
    categories (`dict[int, str]` or `list[dict]`, optional): the classes, as an id2label dict or COCO categories;
        by default every label seen in the references and predictions. Give them when some class may be absent:
        the classes decide which detections count.
    per_class (`bool`, optional): also return `map_per_class` and `mar_100_per_class` (`{class name: value}`).
Returns:
    `dict` of the nine COCO metrics as floats; -1.0 where there is nothing to measure (no ground truth at all, or
    none in a size range).
Examples:
    >>> metric = load_coco_detection_metric()
    >>> results = metric.compute(
    ...     predictions=[{"image_id": 1, "boxes": [[10, 10, 50, 60]], "labels": [0], "scores": [0.9]}],
    ...     references=[{"image_id": 1, "height": 100, "width": 120, "boxes": [[10, 10, 50, 60]], "labels": [0]}],
    ... )
    >>> round(results["map"], 6), results["map_small"]  # one medium object found; no small object to measure
    (1.0, -1.0)
"""

_CITATION = """
@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva
          and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2014}
}
"""

_BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
_OPTIONAL_REFERENCE_KEYS = ("iscrowd", "area")


def _with_optional_keys(references):
    """`evaluate` stores every feature of every row: absent optional columns are stored as None."""
    if references is None:
        return None
    return [
        {**dict.fromkeys(_OPTIONAL_REFERENCE_KEYS), **reference} if isinstance(reference, dict) else reference
        for reference in references
    ]


class CocoDetection(evaluate.Metric):
    """COCO detection metrics of per-image predictions against per-image references (see `_KWARGS_DESCRIPTION`)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "image_id": datasets.Value("int64"),
                        "boxes": _BOXES,
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "scores": datasets.Sequence(datasets.Value("float64")),
                    },
                    "references": {
                        "image_id": datasets.Value("int64"),
                        "height": datasets.Value("int64"),
                        "width": datasets.Value("int64"),
                        "boxes": _BOXES,
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "iscrowd": datasets.Sequence(datasets.Value("int64")),
                        "area": datasets.Sequence(datasets.Value("float64")),
                    },
                }
            ),
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Adds a batch of per-image predictions and references (references may leave out `iscrowd` and `area`)."""
        super().add_batch(predictions=predictions, references=_with_optional_keys(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Adds the prediction and reference of one image (the reference may leave out `iscrowd` and `area`)."""
        reference = _with_optional_keys([reference])[0] if reference is not None else None
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, categories=None, per_class=False):
        if categories is None:
            labels = {label for item in references + predictions for label in item["labels"]}
            if not labels:
                raise ValueError("No label in the references or predictions: pass `categories` to name the classes.")
            categories = {label: str(label) for label in sorted(labels)}
        evaluator = CocoDetectionEvaluator(categories)
        for reference in references:
            # Optional columns absent from a reference come back from the Arrow table as None.
            evaluator.add_ground_truth(
                reference["image_id"],
                reference["height"],
                reference["width"],
                reference["boxes"],
                reference["labels"],
                iscrowd=reference.get("iscrowd"),
                areas=reference.get("area"),
            )
        for prediction in predictions:
            evaluator.add_predictions(
                prediction["image_id"], prediction["boxes"], prediction["labels"], prediction["scores"]
            )
        return evaluator.compute(per_class=per_class)
