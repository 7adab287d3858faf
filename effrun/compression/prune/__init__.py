"""The prune stage: compression/prune=<method>.

magnitude  unstructured: zero the smallest weights (global or per layer, one-shot or AGP)
channel    structured: remove channels with Torch-Pruning, a smaller dense network
nm         N:M semi-structured masks (2:4), for sparse tensor cores; no CPU speed-up

Each fine-tunes with the spine's training loop (finetune_epochs, lr). magnitude and channel can
run a per-layer sensitivity analysis first (sensitivity=true) and follow it
(sensitivity_follow=true).
"""
