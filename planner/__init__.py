"""Galaxy's planner: device profiling and the heterogeneity- and memory-aware partition solver."""
