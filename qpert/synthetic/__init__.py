"""Synthetic coloured-shape scenes: an offline retrieval benchmark with exact boxes."""

from .scenes import COLOURS, POSITIONS, SHAPES, Scene, SceneConfig, SceneObject, make_scene, make_scenes, vocabulary
from .writer import SyntheticLayout, write_flickr30k, write_scenes

__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "SyntheticLayout",
    "make_scene",
    "make_scenes",
    "vocabulary",
    "write_flickr30k",
    "write_scenes",
]
