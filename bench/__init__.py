"""onepass vs torch.optim: ms/step, effective GB/s and % of the same-run roofline.

Run ``python -m bench.run --help``. Each (shape list, algorithm) is one group: every candidate of
the group (the onepass backends, torch.optim fused / foreach / for-loop, and two roofline probes:
a copy and an in-place scale) gets its own params, grads and state, then they are timed
interleaved, one step each per round, so drift on a noisy machine hits all of them alike.
"""
