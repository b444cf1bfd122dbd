"""Embedded offline benchmark: generated tasks (tasks.py) and the checkpoint-zoo builder (zoo.py)."""
