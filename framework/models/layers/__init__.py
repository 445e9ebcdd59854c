"""Building blocks shared by the architectures, written so tensor parallelism can be added later."""
