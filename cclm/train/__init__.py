"""Pretraining under DeepSpeed: engine, schedule, checkpoints, logging and the train loop."""
