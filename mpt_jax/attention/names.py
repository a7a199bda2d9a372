"""The attention backend names: the one list that configs, checks and ``attend`` share."""

IMPLS = ("xla", "pallas", "cudnn", "auto")
