"""COCO box detection metrics (pycocotools COCOeval) as an `evaluate` metric module, loaded from its local path.

    import evaluate
    metric = evaluate.load("path/to/pix2seq_hf/metrics/coco_detection/coco_detection.py")
    # or: pix2seq_hf.evaluation.load_coco_detection_metric()
    metric.add_batch(predictions=[...], references=[...])
    metric.compute()
"""

import datasets
import evaluate

from pix2seq_hf.evaluation import CocoDetectionEvaluator


_DESCRIPTION = """COCO detection metrics (map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100)
computed by pycocotools COCOeval over every prediction (no score threshold)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per image `{"image_id", "boxes" ([n, 4] xyxy pixels), "labels" ([n]), "scores" ([n])}`.
    references: per image `{"image_id", "height", "width", "boxes" ([m, 4] xyxy pixels), "labels" ([m]),
        "iscrowd" ([m], 0/1)}`.
    id2label (`dict`, optional): the classes; by default every label seen in the references and predictions.
Returns:
    `dict` of the nine COCO metrics (-1 where a size range has no ground truth).
"""

_OBJECTS = {
    "image_id": datasets.Value("int64"),
    "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
    "labels": datasets.Sequence(datasets.Value("int64")),
}


class CocoDetection(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {**_OBJECTS, "scores": datasets.Sequence(datasets.Value("float64"))},
                    "references": {
                        **_OBJECTS,
                        "height": datasets.Value("int64"),
                        "width": datasets.Value("int64"),
                        "iscrowd": datasets.Sequence(datasets.Value("int64")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, id2label=None):
        if id2label is None:
            labels = {label for item in references + predictions for label in item["labels"]}
            id2label = {label: str(label) for label in sorted(labels)}
        evaluator = CocoDetectionEvaluator(id2label)
        for reference in references:
            evaluator.add_ground_truth(
                reference["image_id"],
                reference["height"],
                reference["width"],
                reference["boxes"],
                reference["labels"],
                reference.get("iscrowd") or None,
            )
        for prediction in predictions:
            evaluator.add_predictions(
                prediction["image_id"], prediction["boxes"], prediction["labels"], prediction["scores"]
            )
        return evaluator.compute()
