"""Models: backbones (one file per family, timm's contract), heads and foundation-model adapters.

Importing this package registers every visionkit backbone with visionkit's and timm's registries.
"""
