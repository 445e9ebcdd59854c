"""GPU measurement scripts for the Triton attention kernels (run on the device, one call each; see
docs/benchmarks.md). They live here, not in the plugin package, so a server imports none of them."""
