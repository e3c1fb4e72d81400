"""The ShapeWorld verifier: a scene parser for any RGB image of the world."""

from .parser import ParserConfig, SceneParser

__all__ = ["ParserConfig", "SceneParser"]
