"""The runtime every workflow shares: the distributed environment and precision (``env``), optimizer parameter
groups (``optim``), the learning-rate schedule (``schedule``), the DeepSpeed engine (``engine``), checkpoints
(``checkpoint``), run logging (``logging``), FLOPs for MFU (``flops``) and the one training loop (``trainer``).

Nothing here knows a model or a data set: workflows (pretraining, fine-tuning, recipes) hand the trainer a
module whose ``forward(batch, view)`` returns named losses and a batch source.
"""
