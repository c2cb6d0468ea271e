"""Paper-specific methods built on visionkit's tasks, models, ops, data and eval (one subpackage per method).

A method may import ``visionkit.tasks``, ``visionkit.models``, ``visionkit.ops``, ``visionkit.data`` and
``visionkit.eval``; methods never import each other.
"""
