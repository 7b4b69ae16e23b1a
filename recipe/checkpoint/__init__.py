"""Checkpoints on disk: the three forms (HF safetensors, the converted pipeline layout, DeepSpeed training
checkpoints), how each is read, written, checked and exported.

``files`` holds the primitives every form shares: the one safe ``torch.load``, the one resolver that keeps names
read from checkpoints inside their root, hashing while writing and reading, atomic text writes.
``training`` is the commit protocol of training checkpoints and DeepSpeed's checkpoint engine on top of them.
"""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent; the message names the file or key."""
