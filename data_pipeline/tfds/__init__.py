"""Pack scene feature files and language records into TFDS ArrayRecord datasets.

`python -m data_pipeline.tfds --features FEATURES --language RECORDS.jsonl --out TFDS_DIR`
writes `llm3d_scenes/<config>` (one record per scene, features stored once) and
`llm3d_language/<config>` (records joined to their scene by `scene_index`); see `builders`.
"""

from data_pipeline.tfds.build import build
from data_pipeline.tfds.builders import CONFIGS

__all__ = ["CONFIGS", "build"]
