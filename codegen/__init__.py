"""Code generation: TIR schedules, kernels and the deployable bundle format."""
