"""Coordinator side: the Flower ServerApp, the stage pipeline, checkpoints, reports."""
