"""The one validator of the COCO formats: instances JSON (datasets and evaluation alike) and result records.

``COCODataset`` (training) and ``COCOGroundTruth`` / ``evaluate_coco`` (evaluation) both validate through this package,
so a file is accepted or rejected by the same rules everywhere; what legitimately differs (training needs
``file_name`` and masks, evaluation needs ``area``) is a parameter, not a second copy of the rules. Every failure is
a :class:`COCOFormatError` whose message names the file, the record (``annotations[12] (id 345)``, ``result 7``) and
the problem. Nothing malformed reaches pycocotools' or faster-coco-eval's C code, which do not check their input
(a compressed RLE string cut short makes them read past the runs, or hang).

- ``common``: the error type, value tests and the JSON reader;
- ``rle``: compressed RLE strings (checked vectorised with numpy) and uncompressed run lists;
- ``instances``: an instances file;
- ``results``: result records.

This package imports nothing of visionkit outside ``visionkit.utils``, which every layer may use.
"""

from visionkit.utils.coco_format.common import COCOFormatError, read_coco_json
from visionkit.utils.coco_format.instances import COCOInstances, validate_instances
from visionkit.utils.coco_format.results import COCOResults, validate_result_masks, validate_results
from visionkit.utils.coco_format.rle import check_compressed_rles, decode_rle_string, rle_problem

__all__ = [
    "COCOFormatError",
    "COCOInstances",
    "COCOResults",
    "check_compressed_rles",
    "decode_rle_string",
    "read_coco_json",
    "rle_problem",
    "validate_instances",
    "validate_result_masks",
    "validate_results",
]
