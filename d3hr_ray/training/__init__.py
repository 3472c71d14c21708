"""Training on Ray Train: the harness every training job shares, the worker loops, and their objectives.

harness.py          start Ray, the shared run flags (`TrainRunFields`), TorchTrainer, checkpoints, resume
classifier_loop.py  train_teacher's and evaluate's worker loop (hard labels, kd, fixed soft labels)
finetune_loops.py   finetune's worker loops (the VAE, the DiT)
objectives.py       the losses and steps those loops call (pure torch)
"""
