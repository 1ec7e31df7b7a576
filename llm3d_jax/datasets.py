"""Facts about the public datasets that several stages read: the offline importers
(data_pipeline), the input pipeline, inference and the scorers. Plain constants, no imports, so
any layer (and data_pipeline) may use them without loading the training side.
"""

# 3DMV-VQA (Hong et al., CVPR 2023): a question's integer `type` is its family, in the order of
# the 3D-CLR question generator's `family_id` and of the papers' tables.
MV_VQA_QUESTION_TYPES = ("concept", "counting", "relation", "comparison")

# What the released 3D-LLM asks about an Objaverse object (inference.py's object mode, DEMO.md);
# the release calls an object a "3D scene" too.
OBJECT_CAPTION_PROMPT = "Describe the 3D scene."
