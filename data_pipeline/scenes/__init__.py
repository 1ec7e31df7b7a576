"""Scene sources: procedural rooms, ScanNet scans, generic mesh files; all produce one `Scene`."""

from data_pipeline.scenes.scene import Scene, SceneObject

__all__ = ["Scene", "SceneObject"]
